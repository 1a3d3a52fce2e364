"""Every overlay renders, and every object validates against the Kubernetes schemas (strict).

No API server here: ``kubernetes-validate`` checks the objects against the official
OpenAPI schemas of ``K8S_VERSION``; rendering is ``tests/deploy/kustomize.py`` (a subset
renderer, see its docstring). What the objects promise is checked below by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from kubernetes.client import ApiClient

from cloud_controller.broker_auth import render_acl, render_device_acl
from cloud_controller.pool.kubernetes import KubernetesOrchestrator
from cloud_controller.pool.settings import PoolSettings
from cloud_controller.settings import CloudSettings
from edge_agent.settings import EdgeSettings
from protocol.topics import Topics
from tests.deploy.kustomize import Unsupported, render, strategic_merge

K8S_VERSION = "1.37"
"""The newest version kubernetes-validate ships schemas for."""
MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"
OVERLAYS = ["dev", "prod"]

PENDING_SETTINGS: set[str] = set()
"""Env variables an overlay sets that no settings class reads yet (none)."""

PROD_SECRETS = {
    "spillway-postgres",
    "spillway-database",
    "spillway-signing-key",
    "spillway-mqtt-tls",
    "spillway-controller-tls",
    "spillway-mqtt-auth",
    "spillway-mqtt-controller",
    "spillway-mqtt-pool",
}
"""Secrets prod expects to exist (docs/deploy.md creates them)."""


def _rendered(overlay: str) -> list[dict[str, Any]]:
    return render(MANIFESTS / "overlays" / overlay)


def _one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return list(obj["spec"]["template"]["spec"]["containers"])


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, _rendered(request.param)


def test_every_object_validates_strictly(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = overlay
    assert len(objects) > 20
    keys = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(keys) == len(set(keys)), "duplicate objects"
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "spillway"
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "spillway"


def test_controller_has_probes_and_a_service_and_ingress(
    overlay: tuple[str, list[dict[str, Any]]],
) -> None:
    name, objects = overlay
    (controller,) = _containers(_one(objects, "Deployment", "spillway-controller"))
    assert controller["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert controller["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert _one(objects, "Service", "spillway-controller")["spec"]["ports"][0]["port"] == 80
    ingress = _one(objects, "Ingress", "spillway-controller")
    assert bool(ingress["spec"].get("tls")) == (name == "prod")


def test_controller_may_scale_its_pool_and_nothing_else(
    overlay: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objects = overlay
    role = _one(objects, "Role", "spillway-controller")
    assert role["rules"] == [
        {
            "apiGroups": ["apps"],
            "resources": ["statefulsets/scale"],
            "resourceNames": ["spillway-pool"],
            "verbs": ["get", "patch"],
        }
    ]
    assert not [o for o in objects if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    for account in ("spillway-edge-agent", "mosquitto", "postgres"):
        assert _one(objects, "ServiceAccount", account)["automountServiceAccountToken"] is False


def test_edge_agent_daemonset_targets_kubeedge_jetson_nodes(
    overlay: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objects = overlay
    pod = _one(objects, "DaemonSet", "spillway-edge-agent")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"node-role.kubernetes.io/edge": ""}
    assert {
        "key": "node-role.kubernetes.io/edge",
        "operator": "Exists",
        "effect": "NoSchedule",
    } in (pod["tolerations"])
    assert pod["runtimeClassName"] == "nvidia"
    (agent,) = pod["containers"]
    assert agent["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"cpu", "memory"} <= set(agent["resources"]["limits"])
    state = next(v for v in pod["volumes"] if v["name"] == "state")
    assert state["hostPath"]["path"] == "/var/lib/spillway/agent"
    assert _env(agent)["SPILLWAY_EDGE_STATE_DIR"] == "/var/lib/spillway/agent"
    assert _env(agent)["SPILLWAY_EDGE_DEVICE_ID"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}


def test_pool_is_scaled_by_exactly_one_thing(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    name, objects = overlay
    statefulset = _one(objects, "StatefulSet", "spillway-pool")
    assert "--nproc-per-node=2" in _containers(statefulset)[0]["command"]
    hpas = [o for o in objects if o["kind"] == "HorizontalPodAutoscaler"]
    (supervisor,) = _containers(_one(objects, "Deployment", "spillway-pool-supervisor"))
    autoscale = _env(supervisor)["SPILLWAY_POOL_AUTOSCALE"]
    if name == "prod":
        assert [h["spec"]["scaleTargetRef"]["name"] for h in hpas] == ["spillway-pool"]
        assert autoscale == "false"
    else:
        assert hpas == [] and autoscale == "true"


def test_network_policies_deny_by_default_and_open_the_broker_per_overlay(
    overlay: tuple[str, list[dict[str, Any]]],
) -> None:
    name, objects = overlay
    deny = _one(objects, "NetworkPolicy", "default-deny-ingress")
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    open_ports = {
        port["port"]
        for policy in objects
        if policy["kind"] == "NetworkPolicy"
        and policy["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name")
        == "mosquitto"
        for rule in policy["spec"]["ingress"]
        if "from" not in rule
        for port in rule["ports"]
    }
    assert open_ports == ({8883} if name == "prod" else {1883})


def test_secrets_are_generated_in_dev_and_only_referenced_in_prod() -> None:
    def referenced(objects: list[dict[str, Any]]) -> set[str]:
        names = set()
        for obj in objects:
            pod = obj.get("spec", {}).get("template", {}).get("spec", {})
            for volume in pod.get("volumes", []):
                if "secret" in volume:
                    names.add(volume["secret"]["secretName"])
            for container in pod.get("containers", []):
                for value in _env(container).values():
                    if isinstance(value, dict) and "secretKeyRef" in value:
                        names.add(value["secretKeyRef"]["name"])
            for tls in obj.get("spec", {}).get("tls", []) if obj["kind"] == "Ingress" else []:
                names.add(tls["secretName"])
        return names

    dev, prod = _rendered("dev"), _rendered("prod")
    dev_secrets = {o["metadata"]["name"] for o in dev if o["kind"] == "Secret"}
    assert referenced(dev) == dev_secrets == {"spillway-postgres", "spillway-database"}
    assert not [o for o in prod if o["kind"] == "Secret"]
    assert referenced(prod) == PROD_SECRETS
    docs = (MANIFESTS.parent / "docs" / "deploy.md").read_text()
    for secret in PROD_SECRETS:
        assert f"secret generic {secret}" in docs or f"secret tls {secret}" in docs, secret


def test_prod_broker_config_is_the_tls_one() -> None:
    prod = _rendered("prod")
    config = _one(prod, "ConfigMap", "mosquitto-config")["data"]
    assert set(config) == {"mosquitto.conf", "acl", "acl-devices"}
    assert "require_certificate true" in config["mosquitto.conf"]
    assert "password_file /mosquitto/auth/passwd" in config["mosquitto.conf"]
    assert "allow_anonymous true" not in config["mosquitto.conf"]
    # The committed ACLs are exactly what the generator derives from protocol/topics.py.
    assert config["acl"] == render_acl(Topics())
    assert config["acl-devices"] == render_device_acl(Topics())
    (mosquitto,) = _containers(_one(prod, "StatefulSet", "mosquitto"))
    assert {p["containerPort"] for p in mosquitto["ports"]} == {1883, 8883}
    mounts = {m["name"]: m["mountPath"] for m in mosquitto["volumeMounts"]}
    assert mounts["auth"] == "/mosquitto/auth"


def test_prod_cloud_processes_get_their_mqtt_credentials_from_secrets() -> None:
    prod = _rendered("prod")
    wanted = {
        ("Deployment", "spillway-controller"): ("SPILLWAY_MQTT_", "spillway-mqtt-controller"),
        ("StatefulSet", "spillway-pool"): ("SPILLWAY_POOL_MQTT_", "spillway-mqtt-pool"),
        ("Deployment", "spillway-pool-supervisor"): ("SPILLWAY_POOL_MQTT_", "spillway-mqtt-pool"),
    }
    for (kind, name), (prefix, secret) in wanted.items():
        (container,) = _containers(_one(prod, kind, name))
        env = _env(container)
        for key in ("username", "password"):
            ref = env[f"{prefix}{key.upper()}"]
            assert ref == {"secretKeyRef": {"name": secret, "key": key}}, (name, key)
    dev = _rendered("dev")
    dev_conf = _one(dev, "ConfigMap", "mosquitto-config")["data"]["mosquitto.conf"]
    assert dev_conf == (MANIFESTS / "mosquitto" / "mosquitto.conf").read_text()


def test_every_spillway_env_variable_is_a_setting() -> None:
    """A misspelt variable would be ignored silently by pydantic-settings."""
    prefixes = {
        "SPILLWAY_EDGE_": EdgeSettings,
        "SPILLWAY_POOL_": PoolSettings,
        "SPILLWAY_": CloudSettings,
    }
    unknown = set()
    for overlay_name in OVERLAYS:
        for obj in _rendered(overlay_name):
            if "template" not in obj.get("spec", {}):
                continue
            for container in _containers(obj):
                for var in _env(container):
                    if not var.startswith("SPILLWAY_"):
                        continue
                    prefix = next(p for p in prefixes if var.startswith(p))
                    field = var.removeprefix(prefix).lower()
                    if field not in prefixes[prefix].model_fields:
                        unknown.add(var)
    assert unknown == PENDING_SETTINGS


def test_orchestrator_scale_bodies_validate() -> None:
    class Apps:
        def __init__(self) -> None:
            self.bodies: list[Any] = []

        def patch_namespaced_stateful_set_scale(self, name: str, namespace: str, body: Any) -> Any:
            self.bodies.append(body)
            return body

    apps = Apps()
    orchestrator = KubernetesOrchestrator(PoolSettings(), apps)
    for replicas in (3, 1, 0):
        orchestrator.scale(replicas)
    sanitize = ApiClient().sanitize_for_serialization
    for body in apps.bodies:
        obj = sanitize(body)
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        assert obj["metadata"]["name"] == "spillway-pool"  # what the controller's Role allows
    assert [b.spec.replicas for b in apps.bodies] == [3, 1, 0]


def test_renderer_merges_named_lists_and_refuses_what_it_does_not_model(tmp_path: Path) -> None:
    merged = strategic_merge(
        {"env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}], "args": ["x"]},
        {"env": [{"name": "B", "value": "3"}, {"name": "C", "value": "4"}], "args": ["y"]},
    )
    assert merged == {
        "env": [
            {"name": "A", "value": "1"},
            {"name": "B", "value": "3"},
            {"name": "C", "value": "4"},
        ],
        "args": ["y"],
    }
    (tmp_path / "kustomization.yaml").write_text("resources: []\nimages: []\n")
    with pytest.raises(Unsupported):
        render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text("resources: [../outside.yaml]\n")
    with pytest.raises(Unsupported):
        render(tmp_path)
