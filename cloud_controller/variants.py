"""From one dropped model file to signed, quality-gated variants.

A drop is a folder holding ``model.json`` (``name``, ``version``; optionally
``max_sequence_length``, ``tokenizer``, ``source``), one FP32 source - a ``.onnx`` graph or
a TorchScript ``.pt`` - and optionally ``tokenizer.json`` (else the packaged MiniLM one).
``build`` checks, in this order, and stops at the first failure with a typed
``models.errors`` exception:

1. integrity: ``onnx.checker`` accepts the graph / ``torch.jit.load`` opens the module;
2. compatibility: the opset and runtime are ones ``models.loader.check_compatible``
   accepts, and the inputs/outputs are the embedding schema the edge expects
   (``input_ids``/``attention_mask`` int64 ``(batch, sequence)`` -> ``embedding``
   float32 ``(batch, 384)``, L2-normalised);
3. build: the source itself is the ``fp32-onnx`` (``fp32-torchscript``) variant; from an
   ONNX source the INT8 and FP16 variants are built with the recipes of ``models``
   (``quantize_onnx_int8``, ``convert_fp16``);
4. quality gate: every variant's embeddings of held-out text (``models.corpus``) are
   compared with the FP32 source's (``models.quality.compare``) against the gates of
   ``models.build.GATES``; a variant below its gate fails the whole drop (as a failing
   variant fails ``models.build``).

The FP32 source is its own reference (there is no other for an arbitrary new version), so
its recorded metrics are 1.0 by construction; what stands guard for it is steps 1-2 and
the unit-norm check of its outputs. Manifests are signed with the controller's key.

Heavy modules (onnx, onnxruntime, torch) are imported inside the functions; this module is
meant for a worker thread and knows nothing of the database, MQTT or HTTP.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cloud_controller import registry
from models.build import (
    FP16_ONNX,
    FP32_ONNX,
    FP32_TORCHSCRIPT,
    GATES,
    INT8_ONNX,
    MANIFEST_LIFETIME,
    GateFailedError,
)
from models.errors import (
    CorruptArtifactError,
    IncompatibleArtifactError,
    ModelError,
    PermanentModelError,
)
from models.loader import check_compatible, sha256_file
from models.manifest import (
    HardwareClass,
    Manifest,
    Precision,
    RuntimeName,
    SignedManifest,
    TensorSpec,
    sign,
)
from models.quality import QualityMetrics, compare, embed_texts
from models.signing import SigningKey

logger = logging.getLogger(__name__)

METADATA_FILE = "model.json"
TOKENIZER_FILE = "tokenizer.json"
EMBEDDING_DIM = 384
SOURCE_SUFFIXES = (".onnx", ".pt")

_ONNX_INT64 = 7
_ONNX_FLOAT = 1

_FACTS: dict[str, tuple[Precision, RuntimeName, str, list[HardwareClass]]] = {
    FP32_ONNX: (
        Precision.FP32,
        RuntimeName.ONNXRUNTIME,
        "1.18",
        [HardwareClass.X86_CPU, HardwareClass.ARM_CPU, HardwareClass.NVIDIA_GPU],
    ),
    INT8_ONNX: (
        Precision.INT8,
        RuntimeName.ONNXRUNTIME,
        "1.18",
        [HardwareClass.X86_CPU, HardwareClass.ARM_CPU, HardwareClass.JETSON],
    ),
    FP16_ONNX: (Precision.FP16, RuntimeName.ONNXRUNTIME, "1.18", [HardwareClass.NVIDIA_GPU]),
    FP32_TORCHSCRIPT: (
        Precision.FP32,
        RuntimeName.TORCH,
        "2.4",
        [HardwareClass.X86_CPU, HardwareClass.NVIDIA_GPU],
    ),
}
"""Precision, runtime, minimum runtime version and target hardware per buildable variant
(the same facts ``models.build`` publishes its variants with)."""

BUILDABLE = frozenset(_FACTS)


class DropRejected(PermanentModelError):
    """The dropped folder itself is unusable: metadata missing or wrong, no source file."""


class DropMetadata(BaseModel):
    """``model.json`` of a drop."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    max_sequence_length: int = Field(default=256, ge=8, le=8192)
    tokenizer: str | None = None
    """File name of the tokenizer in the folder; default ``tokenizer.json`` when present,
    else the packaged MiniLM tokenizer."""
    source: str | None = None
    """File name of the FP32 source; default the folder's only ``.onnx`` or ``.pt`` file."""


@dataclass(frozen=True)
class Drop:
    folder: Path
    name: str
    version: str
    source: Path
    tokenizer: Path
    max_sequence_length: int

    @property
    def is_onnx(self) -> bool:
        return self.source.suffix == ".onnx"


@dataclass(frozen=True)
class BuiltVariant:
    variant: str
    artifact: Path
    signed: SignedManifest


def folder_identity(folder: Path) -> tuple[str, str] | None:
    """``(name, version)`` parsed from a ``<name>-<version>`` folder name, if it has one."""
    name, sep, version = folder.name.rpartition("-")
    if not sep or not name:
        return None
    try:
        return registry.check_name(name), registry.check_version(version)
    except ValueError:
        return None


def read_drop(folder: Path) -> Drop:
    """Parse a drop's metadata and find its files; raises ``DropRejected``."""
    try:
        raw = json.loads((folder / METADATA_FILE).read_text())
        meta = DropMetadata.model_validate(raw)
    except OSError as exc:
        raise DropRejected(f"cannot read {METADATA_FILE}: {exc.strerror}") from exc
    except (ValueError, ValidationError) as exc:
        raise DropRejected(f"{METADATA_FILE} is not valid metadata: {_first_line(exc)}") from exc
    try:
        registry.check_name(meta.name)
        registry.check_version(meta.version)
    except ValueError as exc:
        raise DropRejected(str(exc)) from exc
    identity = folder_identity(folder)
    if identity is not None and identity[1] != meta.version:
        raise DropRejected(
            f"folder says version {identity[1]}, {METADATA_FILE} says {meta.version}"
        )
    if meta.source is not None:
        source = folder / meta.source
        if source.suffix not in SOURCE_SUFFIXES or not source.is_file():
            raise DropRejected(f"source {meta.source!r} is not a .onnx or .pt file in the folder")
    else:
        sources = sorted(p for p in folder.iterdir() if p.suffix in SOURCE_SUFFIXES)
        if len(sources) != 1:
            found = ", ".join(p.name for p in sources) or "none"
            raise DropRejected(f"expected exactly one .onnx or .pt file, found {found}")
        source = sources[0]
    tokenizer = _tokenizer_path(folder, meta.tokenizer)
    return Drop(
        folder=folder,
        name=meta.name,
        version=meta.version,
        source=source,
        tokenizer=tokenizer,
        max_sequence_length=meta.max_sequence_length,
    )


def _tokenizer_path(folder: Path, name: str | None) -> Path:
    if name is not None:
        path = folder / name
        if not path.is_file():
            raise DropRejected(f"tokenizer {name!r} is not in the folder")
        return path
    if (folder / TOKENIZER_FILE).is_file():
        return folder / TOKENIZER_FILE
    from models.checkpoint import checkpoint_dir

    return checkpoint_dir() / TOKENIZER_FILE


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- integrity and compatibility ----------------------------------------------------------


def _compat(variant: str, opset: int | None) -> None:
    """``models.loader.check_compatible`` on the facts it reads (no full manifest yet)."""
    _, runtime, min_version, _ = _FACTS[variant]
    facts: dict[str, Any] = {
        "variant": variant,
        "runtime": runtime,
        "min_runtime_version": min_version,
        "opset": opset,
    }
    check_compatible(Manifest.model_construct(**facts))


def check_onnx(path: Path) -> int:
    """Integrity and schema of an ONNX source; returns its (default-domain) opset."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError, ValidationError, ...
        raise CorruptArtifactError(
            f"{path.name} is not a valid ONNX model: {_first_line(exc)}"
        ) from exc
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise IncompatibleArtifactError(f"{path.name} imports no default-domain opset")
    graph = proto.graph
    initializers = {init.name for init in graph.initializer}
    inputs = {i.name: i for i in graph.input if i.name not in initializers}
    outputs = {o.name: o for o in graph.output}
    problems = []
    for name in ("input_ids", "attention_mask"):
        spec = inputs.get(name)
        if spec is None:
            problems.append(f"input {name!r} missing")
        elif spec.type.tensor_type.elem_type != _ONNX_INT64:
            problems.append(f"input {name!r} is not int64")
        elif len(spec.type.tensor_type.shape.dim) != 2:
            problems.append(f"input {name!r} is not (batch, sequence)")
    extra = sorted(set(inputs) - {"input_ids", "attention_mask"})
    if extra:
        problems.append(f"unexpected inputs {extra}")
    out = outputs.get("embedding")
    if out is None:
        problems.append("output 'embedding' missing")
    else:
        dims = out.type.tensor_type.shape.dim
        if out.type.tensor_type.elem_type != _ONNX_FLOAT:
            problems.append("output 'embedding' is not float32")
        elif len(dims) != 2 or (dims[1].dim_value not in (0, EMBEDDING_DIM)):
            problems.append(f"output 'embedding' is not (batch, {EMBEDDING_DIM})")
    if problems:
        raise IncompatibleArtifactError(
            f"{path.name} does not match the edge's embedding schema: {'; '.join(problems)}"
        )
    _compat(FP32_ONNX, opset)
    return int(opset)


def _embedder(path: Path) -> Any:
    """An ``EmbeddingBackend`` over ``path``; runtime failures become ``CorruptArtifactError``."""
    try:
        if path.suffix == ".onnx":
            from models.backends import OnnxBackend, onnx_session

            return OnnxBackend(onnx_session(str(path)))
        import torch

        from models.backends import TorchBackend

        return TorchBackend(torch.jit.load(str(path), map_location="cpu").eval())
    except ModelError:
        raise
    except Exception as exc:
        raise CorruptArtifactError(
            f"{path.name} could not be opened by the runtime: {_first_line(exc)}"
        ) from exc


def _embed(backend: Any, tokenizer: Any, texts: list[str], what: str) -> np.ndarray:
    try:
        vectors = np.asarray(embed_texts(backend, tokenizer, texts), dtype=np.float32)
    except ModelError:
        raise
    except Exception as exc:
        raise CorruptArtifactError(f"{what} failed to run: {_first_line(exc)}") from exc
    if vectors.shape != (len(texts), EMBEDDING_DIM):
        raise IncompatibleArtifactError(
            f"{what} gave embeddings of shape {vectors.shape}, expected (N, {EMBEDDING_DIM})"
        )
    if not np.all(np.isfinite(vectors)):
        raise CorruptArtifactError(f"{what} gave non-finite embeddings")
    return vectors


# -- build --------------------------------------------------------------------------------


def _int8(source: Path, target: Path, calibration: list[str], tokenizer: Any) -> None:
    """``models``' INT8 recipe; its outlier channels are picked on the calibration split
    (disjoint from the evaluation text), fed in batches of 8 like ``models.build``."""
    from models.quantization import Int8OnnxRecipe, quantize_onnx_int8

    feeds = []
    for start in range(0, len(calibration), 8):
        ids, mask = tokenizer.encode_batch(calibration[start : start + 8])
        feeds.append({"input_ids": ids, "attention_mask": mask})
    recipe = Int8OnnxRecipe()
    try:
        quantize_onnx_int8(source, target, recipe, calibration=feeds)
    except ValueError:
        # The recipe keeps nodes of the fused MiniLM graph in float by name; another
        # graph does not have them: quantize every candidate and let the gate judge.
        plain = recipe.model_copy(update={"keep_float": ()})
        quantize_onnx_int8(source, target, plain, calibration=feeds)


def _fp16(source: Path, target: Path) -> None:
    from models.export import convert_fp16

    convert_fp16(source, target)


def _manifest(
    drop: Drop,
    variant: str,
    artifact: Path,
    tokenizer_sha256: str,
    metrics: QualityMetrics,
    *,
    opset: int | None,
    release: int,
    now: datetime,
) -> Manifest:
    precision, runtime, min_version, hardware = _FACTS[variant]
    size = artifact.stat().st_size
    return Manifest(
        model_name=drop.name,
        model_version=drop.version,
        variant=variant,
        precision=precision,
        runtime=runtime,
        min_runtime_version=min_version,
        opset=opset if runtime is RuntimeName.ONNXRUNTIME else None,
        artifact=artifact.name,
        sha256=sha256_file(artifact),
        size_bytes=size,
        tokenizer=TOKENIZER_FILE,
        tokenizer_sha256=tokenizer_sha256,
        max_sequence_length=drop.max_sequence_length,
        inputs=[
            TensorSpec(name="input_ids", dtype="int64", shape=["batch", "sequence"]),
            TensorSpec(name="attention_mask", dtype="int64", shape=["batch", "sequence"]),
        ],
        outputs=[TensorSpec(name="embedding", dtype="float32", shape=["batch", EMBEDDING_DIM])],
        quality=metrics,
        quality_gate=GATES[variant].for_samples(metrics.samples),
        target_hardware=hardware,
        # Weights resident twice while the runtime initialises, plus batch-32 activations.
        memory_bytes=2 * size + (256 << 20),
        created_at=now,
        release=release,
        expires_at=now + MANIFEST_LIFETIME,
    )


def build(
    drop: Drop,
    *,
    variants: tuple[str, ...],
    staging: Path,
    eval_sentences: int,
    release: Callable[[str], int],
    key: SigningKey,
    now: datetime,
    progress: Callable[[str], None] = lambda step: None,
) -> list[BuiltVariant]:
    """Validate ``drop``, build and gate its variants into ``staging``; see the docstring."""
    from models.corpus import stdlib_sentences
    from models.tokenization import EmbeddingTokenizer

    if drop.is_onnx:
        opset: int | None = check_onnx(drop.source)
        wanted = [FP32_ONNX, *(v for v in variants if v in (INT8_ONNX, FP16_ONNX))]
        fp32 = FP32_ONNX
    else:
        _compat(FP32_TORCHSCRIPT, None)
        opset, wanted, fp32 = None, [FP32_TORCHSCRIPT], FP32_TORCHSCRIPT
    progress("integrity and compatibility checked")
    try:
        tokenizer = EmbeddingTokenizer.from_file(
            drop.tokenizer, max_length=drop.max_sequence_length
        )
    except Exception as exc:
        raise DropRejected(f"tokenizer {drop.tokenizer.name} unusable: {_first_line(exc)}") from exc
    corpus = stdlib_sentences(evaluation=eval_sentences)
    texts = list(corpus.evaluation)
    reference = _embed(_embedder(drop.source), tokenizer, texts, f"{drop.source.name}")
    norms = np.linalg.norm(reference, axis=1)
    if not np.allclose(norms, 1.0, atol=1e-3):
        raise IncompatibleArtifactError(
            f"{drop.source.name} outputs are not L2-normalised embeddings "
            f"(norms {norms.min():.4f} … {norms.max():.4f})"
        )
    progress("reference embeddings computed")
    tokenizer_sha256 = sha256_file(drop.tokenizer)
    built: list[BuiltVariant] = []
    for variant in dict.fromkeys(wanted):
        if variant == fp32:
            artifact = drop.source
            candidate = reference
            corpus_label = f"{corpus.source}; reference: this FP32 source itself"
        else:
            folder = staging / variant
            folder.mkdir(parents=True, exist_ok=True)
            artifact = folder / "model.onnx"
            try:
                if variant == INT8_ONNX:
                    _int8(drop.source, artifact, list(corpus.calibration), tokenizer)
                else:
                    _fp16(drop.source, artifact)
            except Exception as exc:
                raise CorruptArtifactError(
                    f"building {variant} from {drop.source.name} failed: {_first_line(exc)}"
                ) from exc
            candidate = _embed(_embedder(artifact), tokenizer, texts, variant)
            corpus_label = f"{corpus.source}; reference: the FP32 source"
        metrics = compare(reference, candidate, corpus=corpus_label)
        gate = GATES[variant].for_samples(metrics.samples)
        failures = gate.failures(metrics)
        if failures:
            raise GateFailedError(f"{variant} below its quality gate: {'; '.join(failures)}")
        manifest = _manifest(
            drop,
            variant,
            artifact,
            tokenizer_sha256,
            metrics,
            opset=opset,
            release=release(variant),
            now=now,
        )
        built.append(BuiltVariant(variant=variant, artifact=artifact, signed=sign(manifest, key)))
        progress(f"{variant} built and gated")
        logger.info(
            "variant passed its gate",
            extra={
                "model": drop.name,
                "version": drop.version,
                "variant": variant,
                "mean_cosine": metrics.mean_cosine,
                "min_cosine": metrics.min_cosine,
                "top1_agreement": metrics.top1_agreement,
            },
        )
    return built


def remove_staging(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
