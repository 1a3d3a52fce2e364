"""The Kubernetes backend: the pool is a StatefulSet, scaled on queue depth by the supervisor.

Why a StatefulSet: a replica's MQTT client id is its pod name (``spillway-pool-0`` …), stable
across restarts, so a restarted pod gets its broker session back together with the requests
it had not acknowledged, and its answered-request store sits on its own volume. Inside a pod,
``torchrun --nproc-per-node=TP --max-restarts=…`` starts the TP ranks and restarts the whole
group when one dies; the kubelet restarts the pod if torchrun itself gives up.

``KubernetesOrchestrator`` only patches ``statefulsets/scale`` through an injected
``AppsV1Api``-like client, so tests run without an API server; the objects it sends and the
manifests it renders (``manifests/pool``) are checked against the official schemas with
``kubernetes-validate``. ``pool_hpa`` is the alternative for clusters with an external-metrics
adapter: a HorizontalPodAutoscaler on ``spillway_pool_queue_depth`` (use it or the
supervisor's scaling, not both).

Errors (both temporary: the supervisor retries on its next tick)::

    OrchestratorError      (cloud_controller.pool.orchestrator)
    └── ScaleFailed        the API server refused or could not be reached
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

from kubernetes import client as k8s

from cloud_controller.pool.orchestrator import OrchestratorError
from cloud_controller.pool.settings import PoolSettings

logger = logging.getLogger(__name__)

APP_LABEL = "spillway-pool"
STATE_MOUNT = "/var/lib/spillway-pool"
DEFAULT_IMAGE = "ghcr.io/spillway/spillway:0.1.0"
QUEUE_METRIC = "spillway_pool_queue_depth"


class ScaleFailed(OrchestratorError):
    pass


class AppsApi(Protocol):
    """The part of ``kubernetes.client.AppsV1Api`` the orchestrator calls."""

    def patch_namespaced_stateful_set_scale(self, name: str, namespace: str, body: Any) -> Any: ...


def scale_body(settings: PoolSettings, replicas: int) -> k8s.V1Scale:
    """The ``autoscaling/v1`` Scale the orchestrator sends to ``statefulsets/scale``."""
    return k8s.V1Scale(
        api_version="autoscaling/v1",
        kind="Scale",
        metadata=k8s.V1ObjectMeta(name=settings.k8s_statefulset, namespace=settings.k8s_namespace),
        spec=k8s.V1ScaleSpec(replicas=replicas),
    )


class KubernetesOrchestrator:
    """Scales the pool's StatefulSet; restarts are the kubelet's and torchrun's job."""

    def __init__(self, settings: PoolSettings, apps: AppsApi) -> None:
        self._settings = settings
        self._apps = apps
        self._desired: int | None = None
        self.sent: list[k8s.V1Scale] = []
        """Every Scale sent, oldest first (what tests validate)."""

    def desired(self) -> int:
        return self._desired or 0

    def scale(self, replicas: int) -> None:
        if replicas == self._desired:
            return
        body = scale_body(self._settings, replicas)
        try:
            self._apps.patch_namespaced_stateful_set_scale(
                self._settings.k8s_statefulset, self._settings.k8s_namespace, body
            )
        except Exception as exc:  # ApiException, urllib3 errors: all mean "not now"
            raise ScaleFailed(f"scaling {self._settings.k8s_statefulset} failed: {exc}") from exc
        self.sent.append(body)
        logger.info("scaled statefulset", extra={"replicas": replicas, "from": self._desired})
        self._desired = replicas

    def supervise(self) -> None:
        """Nothing to do: pods are restarted by the kubelet, ranks by torchrun."""

    def shutdown(self) -> None:
        """The StatefulSet outlives the supervisor; replicas keep serving."""


def apps_api_from_environment() -> AppsApi:
    """In-cluster credentials when running in a pod, else the local kubeconfig."""
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return k8s.AppsV1Api()


# -- objects and manifests ------------------------------------------------------------------


def _labels(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": APP_LABEL, "app.kubernetes.io/component": component}


def _replica_env(settings: PoolSettings) -> list[k8s.V1EnvVar]:
    env = [
        k8s.V1EnvVar(name=name, value=value)
        for name, value in sorted(settings.as_env().items())
        if not name.endswith(("_REPLICA_ID", "_STATE_DIR"))
    ]
    env.append(k8s.V1EnvVar(name="SPILLWAY_POOL_STATE_DIR", value=STATE_MOUNT))
    env.append(
        k8s.V1EnvVar(
            name="SPILLWAY_POOL_REPLICA_ID",
            value_from=k8s.V1EnvVarSource(
                field_ref=k8s.V1ObjectFieldSelector(field_path="metadata.name")
            ),
        )
    )
    return env


def pool_statefulset(settings: PoolSettings, *, image: str = DEFAULT_IMAGE) -> k8s.V1StatefulSet:
    """One pod per replica; torchrun starts ``settings.tp`` ranks inside it."""
    labels = _labels("replica")
    gpu = settings.device == "cuda"
    limits = {"nvidia.com/gpu": str(settings.tp)} if gpu else {"cpu": str(2 * settings.tp)}
    container = k8s.V1Container(
        name="replica",
        image=image,
        command=[
            "torchrun",
            "--standalone",
            f"--nproc-per-node={settings.tp}",
            "--max-restarts=1000",
            "-m",
            "cloud_controller.pool.replica",
        ],
        env=_replica_env(settings),
        resources=k8s.V1ResourceRequirements(
            requests={"cpu": str(settings.tp), "memory": f"{768 * settings.tp}Mi"},
            limits={**limits, "memory": f"{1536 * settings.tp}Mi"},
        ),
        volume_mounts=[
            k8s.V1VolumeMount(name="state", mount_path=STATE_MOUNT),
            k8s.V1VolumeMount(name="tmp", mount_path="/tmp"),  # torchrun's rendezvous files
        ],
        security_context=k8s.V1SecurityContext(
            run_as_non_root=True, allow_privilege_escalation=False, read_only_root_filesystem=True
        ),
    )
    return k8s.V1StatefulSet(
        api_version="apps/v1",
        kind="StatefulSet",
        metadata=k8s.V1ObjectMeta(
            name=settings.k8s_statefulset, namespace=settings.k8s_namespace, labels=labels
        ),
        spec=k8s.V1StatefulSetSpec(
            service_name=settings.k8s_statefulset,
            replicas=settings.replicas,
            pod_management_policy="Parallel",
            selector=k8s.V1LabelSelector(match_labels=labels),
            template=k8s.V1PodTemplateSpec(
                metadata=k8s.V1ObjectMeta(labels=labels),
                spec=k8s.V1PodSpec(
                    containers=[container],
                    termination_grace_period_seconds=30,
                    security_context=k8s.V1PodSecurityContext(run_as_user=1000, fs_group=1000),
                    volumes=[
                        k8s.V1Volume(
                            name="tmp", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory")
                        )
                    ],
                ),
            ),
            volume_claim_templates=[
                k8s.V1PersistentVolumeClaim(
                    metadata=k8s.V1ObjectMeta(name="state"),
                    spec=k8s.V1PersistentVolumeClaimSpec(
                        access_modes=["ReadWriteOnce"],
                        resources=k8s.V1VolumeResourceRequirements(requests={"storage": "1Gi"}),
                    ),
                )
            ],
        ),
    )


def pool_service(settings: PoolSettings) -> k8s.V1Service:
    """The headless Service that gives the StatefulSet's pods their stable names."""
    return k8s.V1Service(
        api_version="v1",
        kind="Service",
        metadata=k8s.V1ObjectMeta(
            name=settings.k8s_statefulset,
            namespace=settings.k8s_namespace,
            labels=_labels("replica"),
        ),
        spec=k8s.V1ServiceSpec(cluster_ip="None", selector=_labels("replica")),
    )


def supervisor_objects(settings: PoolSettings, *, image: str = DEFAULT_IMAGE) -> list[Any]:
    """ServiceAccount, Role (get/patch ``statefulsets/scale``), RoleBinding, Deployment."""
    name = f"{settings.k8s_statefulset}-supervisor"
    ns = settings.k8s_namespace
    labels = _labels("supervisor")
    role = k8s.V1Role(
        api_version="rbac.authorization.k8s.io/v1",
        kind="Role",
        metadata=k8s.V1ObjectMeta(name=name, namespace=ns, labels=labels),
        rules=[
            k8s.V1PolicyRule(
                api_groups=["apps"],
                resources=["statefulsets/scale"],
                resource_names=[settings.k8s_statefulset],
                verbs=["get", "patch"],
            ),
            k8s.V1PolicyRule(
                api_groups=["apps"],
                resources=["statefulsets"],
                resource_names=[settings.k8s_statefulset],
                verbs=["get"],
            ),
        ],
    )
    binding = k8s.V1RoleBinding(
        api_version="rbac.authorization.k8s.io/v1",
        kind="RoleBinding",
        metadata=k8s.V1ObjectMeta(name=name, namespace=ns, labels=labels),
        role_ref=k8s.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name=name),
        subjects=[k8s.RbacV1Subject(kind="ServiceAccount", name=name, namespace=ns)],
    )
    account = k8s.V1ServiceAccount(
        api_version="v1",
        kind="ServiceAccount",
        metadata=k8s.V1ObjectMeta(name=name, namespace=ns, labels=labels),
    )
    env = [
        k8s.V1EnvVar(name=key, value=value)
        for key, value in sorted(settings.as_env().items())
        if not key.endswith(("_REPLICA_ID", "_STATE_DIR"))
    ]
    deployment = k8s.V1Deployment(
        api_version="apps/v1",
        kind="Deployment",
        metadata=k8s.V1ObjectMeta(name=name, namespace=ns, labels=labels),
        spec=k8s.V1DeploymentSpec(
            replicas=1,
            strategy=k8s.V1DeploymentStrategy(type="Recreate"),
            selector=k8s.V1LabelSelector(match_labels=labels),
            template=k8s.V1PodTemplateSpec(
                metadata=k8s.V1ObjectMeta(labels=labels),
                spec=k8s.V1PodSpec(
                    service_account_name=name,
                    containers=[
                        k8s.V1Container(
                            name="supervisor",
                            image=image,
                            command=["spillway", "pool", "serve", "--backend", "kubernetes"],
                            env=env,
                            resources=k8s.V1ResourceRequirements(
                                requests={"cpu": "100m", "memory": "128Mi"},
                                limits={"memory": "256Mi"},
                            ),
                            security_context=k8s.V1SecurityContext(
                                run_as_non_root=True,
                                run_as_user=1000,
                                allow_privilege_escalation=False,
                                read_only_root_filesystem=True,
                            ),
                        )
                    ],
                ),
            ),
        ),
    )
    return [account, role, binding, deployment]


def pool_hpa(settings: PoolSettings) -> k8s.V2HorizontalPodAutoscaler:
    """HPA on the external metric ``spillway_pool_queue_depth`` (needs a metrics adapter)."""
    return k8s.V2HorizontalPodAutoscaler(
        api_version="autoscaling/v2",
        kind="HorizontalPodAutoscaler",
        metadata=k8s.V1ObjectMeta(
            name=settings.k8s_statefulset, namespace=settings.k8s_namespace, labels=_labels("hpa")
        ),
        spec=k8s.V2HorizontalPodAutoscalerSpec(
            scale_target_ref=k8s.V2CrossVersionObjectReference(
                api_version="apps/v1", kind="StatefulSet", name=settings.k8s_statefulset
            ),
            min_replicas=max(1, settings.min_replicas),
            max_replicas=settings.max_replicas,
            metrics=[
                k8s.V2MetricSpec(
                    type="External",
                    external=k8s.V2ExternalMetricSource(
                        metric=k8s.V2MetricIdentifier(name=QUEUE_METRIC),
                        target=k8s.V2MetricTarget(
                            type="AverageValue", average_value=str(settings.high_water_items // 4)
                        ),
                    ),
                )
            ],
            behavior=k8s.V2HorizontalPodAutoscalerBehavior(
                scale_down=k8s.V2HPAScalingRules(
                    stabilization_window_seconds=int(settings.scale_down_cooldown_s)
                )
            ),
        ),
    )


def render_manifests(settings: PoolSettings, *, image: str = DEFAULT_IMAGE) -> dict[str, list[Any]]:
    """File name -> plain objects, as ``manifests/pool`` holds them."""
    sanitize = k8s.ApiClient().sanitize_for_serialization
    return {
        "statefulset.yaml": [
            sanitize(pool_service(settings)),
            sanitize(pool_statefulset(settings, image=image)),
        ],
        "supervisor.yaml": [sanitize(obj) for obj in supervisor_objects(settings, image=image)],
        "hpa.yaml": [sanitize(pool_hpa(settings))],
    }


def manifest_settings() -> PoolSettings:
    """The settings ``manifests/pool`` is rendered from (cluster DNS for the broker).

    Validated without reading ``SPILLWAY_POOL_*``, so the output never depends on the shell.
    """
    return PoolSettings.model_validate(
        {
            "mqtt_host": "mosquitto.spillway.svc.cluster.local",
            "replicas": 2,
            "min_replicas": 1,
            "max_replicas": 8,
            "autoscale": True,
            "tp": 2,
            "threads_per_rank": 1,
        }
    )


MANIFEST_HEADER = (
    "# Generated by 'spillway pool manifests' from cloud_controller/pool/kubernetes.py;\n"
    "# edit the code, not this file (tests/pool checks they agree).\n"
)


def manifest_text(objects: list[Any]) -> str:
    import yaml

    return MANIFEST_HEADER + yaml.safe_dump_all(objects, sort_keys=False)


def write_manifests(rendered: dict[str, list[Any]], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, objects in rendered.items():
        path = out / name
        path.write_text(manifest_text(objects))
        written.append(path)
    return written
