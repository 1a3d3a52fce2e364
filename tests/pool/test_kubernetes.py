"""The Kubernetes backend's objects validate against the official schemas (no API server here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes.client import ApiClient

from cloud_controller.pool.kubernetes import (
    KubernetesOrchestrator,
    ScaleFailed,
    manifest_settings,
    manifest_text,
    pool_hpa,
    pool_statefulset,
    render_manifests,
)
from cloud_controller.pool.settings import PoolSettings
from cloud_controller.pool.supervisor import PoolSupervisor

K8S_VERSION = "1.33"
MANIFESTS = Path(__file__).resolve().parents[2] / "manifests" / "pool"


class FakeAppsApi:
    """Records what would have gone to ``PATCH .../statefulsets/{name}/scale``."""

    def __init__(self, *, fail: bool = False) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.fail = fail

    def patch_namespaced_stateful_set_scale(self, name: str, namespace: str, body: Any) -> Any:
        if self.fail:
            raise OSError("connection refused")
        self.calls.append((name, namespace, body))
        return body


def _validate(obj: Any) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_scale_patches_validate_and_name_the_statefulset() -> None:
    settings = PoolSettings(k8s_namespace="edge-cloud", k8s_statefulset="pool-a")
    api = FakeAppsApi()
    orchestrator = KubernetesOrchestrator(settings, api)
    orchestrator.scale(3)
    orchestrator.scale(3)  # unchanged: not sent again
    orchestrator.scale(1)
    assert [(name, ns) for name, ns, _ in api.calls] == [("pool-a", "edge-cloud")] * 2
    sanitize = ApiClient().sanitize_for_serialization
    bodies = [sanitize(body) for _, _, body in api.calls]
    assert [b["spec"]["replicas"] for b in bodies] == [3, 1]
    for body in bodies:
        assert body["kind"] == "Scale" and body["apiVersion"] == "autoscaling/v1"
        _validate(body)


def test_scale_failure_is_a_temporary_orchestrator_error() -> None:
    orchestrator = KubernetesOrchestrator(PoolSettings(), FakeAppsApi(fail=True))
    with pytest.raises(ScaleFailed):
        orchestrator.scale(2)
    assert orchestrator.desired() == 0  # retried on the next tick


def test_supervisor_autoscales_the_statefulset_on_queue_depth() -> None:
    settings = PoolSettings(
        autoscale=True, replicas=1, min_replicas=1, max_replicas=4, target_wait_ms=100
    )
    api = FakeAppsApi()
    supervisor = PoolSupervisor(settings, KubernetesOrchestrator(settings, api), mqtt=_NoMqtt())
    supervisor.orchestrator.scale(1)
    from cloud_controller.pool.backpressure import ReplicaLoad
    from protocol.codec import encode
    from protocol.mqtt import InboundMessage

    load = ReplicaLoad(
        device_id="spillway-pool-0",
        ready=True,
        tp=2,
        outstanding_requests=30,
        outstanding_items=120,
        per_item_ms=2.0,
        answered=0,
        computed=0,
    )
    supervisor._on_load(InboundMessage("t", encode(load), 0, False))
    status = supervisor.step()
    assert status.queue_depth == 30 and status.replicas == 1
    assert [body.spec.replicas for _, _, body in api.calls] == [1, 3]  # 240 ms of work / 100 ms


class _NoMqtt:
    def subscribe(self, *args: Any, **kwargs: Any) -> None: ...
    def start(self) -> None: ...
    def publish(self, *args: Any, **kwargs: Any) -> None: ...
    def stop(self, **kwargs: Any) -> None: ...


@pytest.mark.parametrize("name", ["statefulset.yaml", "supervisor.yaml", "hpa.yaml"])
def test_manifests_validate_and_match_the_code(name: str) -> None:
    text = (MANIFESTS / name).read_text()
    objects = list(yaml.safe_load_all(text))
    assert objects
    for obj in objects:
        _validate(obj)
    rendered = render_manifests(manifest_settings())[name]
    assert text == manifest_text(rendered), "stale: run 'spillway pool manifests'"


def test_objects_for_other_settings_validate() -> None:
    sanitize = ApiClient().sanitize_for_serialization
    gpu = PoolSettings(device="cuda", dtype="bfloat16", tp=4, replicas=3)
    statefulset = sanitize(pool_statefulset(gpu))
    _validate(statefulset)
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    assert "--nproc-per-node=4" in container["command"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    env = {e["name"]: e for e in container["env"]}
    assert env["SPILLWAY_POOL_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    _validate(sanitize(pool_hpa(gpu)))
