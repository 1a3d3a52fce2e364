"""A subset kustomize renderer: just what ``manifests/`` uses, and loud about the rest.

There is no kustomize or kubectl binary here (the PyPI wrappers download one at run time),
so the tests render the overlays with this. It supports: ``resources`` (files and
directories holding a ``kustomization.yaml``), ``namespace``, ``labels`` (``pairs`` on
``metadata.labels`` only, i.e. ``includeSelectors: false``; ``commonLabels`` is refused
because it rewrites selectors),
``patches`` with a ``path`` to a strategic-merge patch matched by kind and name (maps merge,
lists of maps with a ``name`` merge by name, other lists are replaced, ``$patch: delete``
removes the object), ``configMapGenerator``/``secretGenerator`` from ``files`` and
``literals`` with ``behavior`` create/replace/merge, and ``generatorOptions:
disableNameSuffixHash: true``. Anything else raises ``Unsupported``, so a kustomization
that grows a feature this does not model fails the tests instead of rendering wrong.
Files must sit inside the kustomization's own folder, as kustomize's default load
restrictor demands. Real ``kubectl kustomize`` remains the reference.
"""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

KNOWN = {
    "apiVersion",
    "kind",
    "namespace",
    "labels",
    "commonLabels",
    "resources",
    "patches",
    "configMapGenerator",
    "secretGenerator",
    "generatorOptions",
}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "RuntimeClass"}


class Unsupported(ValueError):
    """The kustomization uses something this renderer does not model."""


def _inside(root: Path, relative: str) -> Path:
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise Unsupported(f"{relative}: outside {root} (kustomize's load restrictor refuses it)")
    return path


def _key(obj: Obj) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def strategic_merge(target: Any, patch: Any) -> Any:
    """Merge ``patch`` into ``target`` (the subset described in the module docstring)."""
    if isinstance(target, dict) and isinstance(patch, dict):
        merged = dict(target)
        for key, value in patch.items():
            merged[key] = strategic_merge(target[key], value) if key in target else value
        return merged
    named = (
        isinstance(target, list)
        and isinstance(patch, list)
        and all(isinstance(i, dict) and "name" in i for i in [*target, *patch])
    )
    if named:
        result = [copy.deepcopy(i) for i in target]
        for item in patch:
            at = next((n for n, t in enumerate(result) if t["name"] == item["name"]), None)
            if at is None:
                result.append(item)
            else:
                result[at] = strategic_merge(result[at], item)
        return result
    return copy.deepcopy(patch)


def _generated(kind: str, spec: Obj, root: Path) -> Obj:
    unknown = set(spec) - {"name", "files", "literals", "behavior", "type"}
    if unknown:
        raise Unsupported(f"{kind} generator keys {sorted(unknown)}")
    data: dict[str, str] = {}
    for entry in spec.get("files", []):
        key, _, path = entry.rpartition("=")
        source = _inside(root, path)
        data[key or source.name] = source.read_text()
    for entry in spec.get("literals", []):
        key, _, value = entry.partition("=")
        data[key] = value
    obj: Obj = {"apiVersion": "v1", "kind": kind, "metadata": {"name": spec["name"]}}
    if kind == "Secret":
        obj["type"] = spec.get("type", "Opaque")
        obj["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    else:
        obj["data"] = data
    return obj


def render(directory: Path) -> list[Obj]:
    """The objects ``kubectl kustomize directory`` would print (for the supported subset)."""
    root = directory.resolve()
    spec = yaml.safe_load((root / "kustomization.yaml").read_text())
    unknown = set(spec) - KNOWN
    if unknown:
        raise Unsupported(f"{root}: keys {sorted(unknown)}")
    objects: list[Obj] = []
    for entry in spec.get("resources", []):
        path = (root / entry).resolve()
        if path.is_dir():
            objects.extend(render(path))
        else:
            path = _inside(root, entry)
            objects.extend(o for o in yaml.safe_load_all(path.read_text()) if o)

    generated = [("ConfigMap", g) for g in spec.get("configMapGenerator", [])]
    generated += [("Secret", g) for g in spec.get("secretGenerator", [])]
    if generated and spec.get("generatorOptions", {}) != {"disableNameSuffixHash": True}:
        raise Unsupported("generators need generatorOptions: {disableNameSuffixHash: true}")
    for kind, gen in generated:
        made = _generated(kind, gen, root)
        behavior = gen.get("behavior", "create")
        existing = [n for n, o in enumerate(objects) if _key(o) == _key(made)]
        if behavior == "create":
            if existing:
                raise ValueError(f"{_key(made)} generated twice")
            objects.append(made)
        elif behavior in ("replace", "merge") and existing:
            old = objects[existing[0]]
            if behavior == "merge":
                made["data"] = {**old.get("data", {}), **made["data"]}
            made["metadata"] = old["metadata"]
            objects[existing[0]] = made
        else:
            raise Unsupported(f"generator behavior {behavior!r} for {_key(made)}")

    for entry in spec.get("patches", []):
        if set(entry) != {"path"}:
            raise Unsupported(f"patch {entry}: only 'path' (strategic merge) is supported")
        patch = yaml.safe_load(_inside(root, entry["path"]).read_text())
        matches = [n for n, o in enumerate(objects) if _key(o) == _key(patch)]
        if len(matches) != 1:
            raise ValueError(f"patch {entry['path']} matches {len(matches)} objects")
        if patch.get("$patch") == "delete":
            del objects[matches[0]]
        else:
            objects[matches[0]] = strategic_merge(objects[matches[0]], patch)

    namespace = spec.get("namespace")
    pairs: dict[str, str] = {}
    for group in spec.get("labels", []):
        if set(group) - {"pairs", "includeSelectors"} or group.get("includeSelectors"):
            raise Unsupported(f"labels entry {group}: only pairs without selectors")
        pairs.update(group["pairs"])
    if spec.get("commonLabels"):
        raise Unsupported("commonLabels rewrites selectors; use labels with pairs")
    result = []
    for obj in objects:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if namespace and obj["kind"] not in CLUSTER_SCOPED:
            meta["namespace"] = namespace
        if pairs:
            meta["labels"] = {**meta.get("labels", {}), **pairs}
        result.append(obj)
    return result
