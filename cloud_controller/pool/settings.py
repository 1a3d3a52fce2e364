"""The pool's settings: one ``PoolSettings`` per pool process, built in the CLI and passed down.

Values come from keyword arguments (CLI options) first, then from ``SPILLWAY_POOL_*``
environment variables. The supervisor hands its settings to the replicas it starts through
those same variables, so a replica started by hand, by ``torchrun`` or by a Kubernetes
StatefulSet reads exactly what a locally spawned one does.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from protocol.mqtt import MqttSettings
from protocol.topics import DEFAULT_ROOT
from spillway.batching import BatcherSettings
from spillway.preflight import check_mqtt_credentials

ENV_PREFIX = "SPILLWAY_POOL_"


class PoolSettings(BaseSettings):
    """Everything a pool supervisor or replica needs at start."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, validate_default=True
    )

    mqtt_host: str = "127.0.0.1"
    """Broker host name or address."""
    mqtt_port: int = Field(default=1883, ge=1, le=65535)
    """Broker TCP port."""
    mqtt_keepalive_s: int = Field(default=10, ge=1)
    """MQTT keepalive in seconds."""
    mqtt_session_expiry_s: int = Field(default=3600, ge=0)
    """Seconds the broker keeps a replica's session (and its unacknowledged requests) while
    the replica restarts."""
    mqtt_username: str | None = Field(default=None, min_length=1)
    """Username of the pool's supervisor and replicas (``spillway certs mqtt-user
    spillway-pool --role pool``); None: anonymous, for a development broker only."""
    mqtt_password: SecretStr | None = None
    """Password of ``mqtt_username``, from the environment (``SPILLWAY_POOL_MQTT_PASSWORD``,
    a Secret in Kubernetes), never a command line. Never logged."""
    mqtt_tls_ca_file: Path | None = None
    """CA certificate that signed the broker's certificate; None = plain TCP."""
    mqtt_tls_cert_file: Path | None = None
    """Client certificate for a listener that requires one; None = none."""
    mqtt_tls_key_file: Path | None = None
    """Private key of ``mqtt_tls_cert_file``."""
    topic_root: str = Field(default=DEFAULT_ROOT, min_length=1)
    """First levels of every topic."""
    client_id_prefix: str = Field(default="spillway-pool", min_length=1, max_length=48)
    """Replica ``i`` connects as ``{prefix}-{i}``; the supervisor as ``{prefix}-supervisor``."""
    replica_id: str | None = Field(default=None, max_length=64)
    """This replica's MQTT client id; None: ``$HOSTNAME`` (a StatefulSet pod's stable name)."""

    replicas: int = Field(default=1, ge=0, le=64)
    """Replicas to start with (and to keep, unless ``autoscale``)."""
    min_replicas: int = Field(default=1, ge=0, le=64)
    """Fewest replicas autoscaling leaves running."""
    max_replicas: int = Field(default=4, ge=1, le=64)
    """Most replicas autoscaling starts."""
    autoscale: bool = False
    """Scale on queue depth between ``min_replicas`` and ``max_replicas``."""
    target_wait_ms: float = Field(default=500.0, gt=0)
    """Autoscaling keeps the estimated queue wait under this many milliseconds."""
    scale_down_cooldown_s: float = Field(default=30.0, ge=0)
    """Seconds between two scale-downs (scale-ups are immediate)."""

    tp: int = Field(default=1, ge=1, le=12)
    """Tensor-parallel ranks per replica; must divide the model's 12 heads."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Where the ranks compute: gloo on CPU, NCCL on CUDA (rank r on ``cuda:LOCAL_RANK``)."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Compute precision; the pool is full precision unless asked (FP16/BF16 need CUDA)."""
    threads_per_rank: int | None = Field(default=None, ge=1)
    """torch intra-op threads per rank; None: the CPUs divided by all ranks, at least 1."""
    collective_timeout_s: float = Field(default=60.0, gt=0)
    """A collective that waits longer fails, and the replica restarts."""
    heartbeat_s: float = Field(default=5.0, gt=0)
    """Rank 0 sends an empty broadcast after this many idle seconds so ranks notice a dead
    peer and the collective timeout never fires on an idle group."""

    max_batch_size: int = Field(default=32, ge=1)
    """Most texts in one forward pass."""
    max_queue_delay_ms: float = Field(default=5.0, ge=0)
    """How long the oldest request waits for others to join its batch."""
    max_queue_items: int = Field(default=1024, ge=1)
    """Texts a replica queues before answering ``overloaded``."""
    high_water_items: int = Field(default=256, ge=1)
    """Queued texts per live replica above which the pool says ``accepting=False``."""

    load_interval_s: float = Field(default=0.5, gt=0)
    """How often a replica reports its load to the supervisor."""
    status_interval_s: float = Field(default=1.0, gt=0)
    """How often the supervisor republishes ``PoolStatus`` when nothing changed."""
    stale_after_s: float = Field(default=5.0, gt=0)
    """A replica silent this long is not counted as live."""
    publish_timeout_s: float = Field(default=10.0, gt=0)
    """Wait for the broker's PUBACK of an answer before giving up (the request is redelivered)."""
    answered_capacity: int = Field(default=4096, ge=1)
    """Answered requests remembered per replica for idempotency."""
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """TCP port of each replica's Prometheus ``/metrics``; None: not served. Replicas sharing
    a host need their own port (a taken port is logged and metrics are skipped)."""
    metrics_host: str | None = None
    """Address the replica's ``/metrics`` listens on; None: every interface."""
    state_dir: Path = Path("var/pool")
    """Per-replica state (answered-request store) and, for local replicas, rank logs."""

    backend: Literal["local", "kubernetes"] = "local"
    """Who runs the replicas: local processes, or a Kubernetes StatefulSet."""
    k8s_namespace: str = "spillway"
    """Namespace of the pool's StatefulSet."""
    k8s_statefulset: str = "spillway-pool"
    """Name of the pool's StatefulSet (its pods are the replicas)."""

    @model_validator(mode="after")
    def _bounds(self) -> PoolSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        if self.dtype != "float32" and self.device != "cuda":
            raise ValueError(f"dtype {self.dtype} needs device=cuda; the CPU pool runs float32")
        check_mqtt_credentials(
            username=self.mqtt_username,
            password=self.mqtt_password,
            ca_file=self.mqtt_tls_ca_file,
            cert_file=self.mqtt_tls_cert_file,
            key_file=self.mqtt_tls_key_file,
        )
        return self

    def replica_client_id(self, index: int) -> str:
        return f"{self.client_id_prefix}-{index}"

    def supervisor_client_id(self) -> str:
        return f"{self.client_id_prefix}-supervisor"

    def own_replica_id(self) -> str:
        return self.replica_id or os.environ.get("HOSTNAME") or socket.gethostname()

    def torch_threads(self, *, ranks_on_host: int) -> int:
        if self.threads_per_rank is not None:
            return self.threads_per_rank
        return max(1, (os.cpu_count() or 1) // max(1, ranks_on_host))

    def batcher(self) -> BatcherSettings:
        return BatcherSettings(
            max_batch_size=self.max_batch_size,
            min_batch_size=self.max_batch_size,
            max_queue_delay_ms=self.max_queue_delay_ms,
            max_queue_items=self.max_queue_items,
            latency_budget_ms=1e9,
        )

    def mqtt(self, client_id: str, *, manual_ack: bool = False) -> MqttSettings:
        return MqttSettings(
            host=self.mqtt_host,
            port=self.mqtt_port,
            client_id=client_id,
            keepalive_s=self.mqtt_keepalive_s,
            session_expiry_s=self.mqtt_session_expiry_s,
            manual_ack=manual_ack,
            username=self.mqtt_username,
            password=self.mqtt_password.get_secret_value() if self.mqtt_password else None,
            tls_ca_file=str(self.mqtt_tls_ca_file) if self.mqtt_tls_ca_file else None,
            tls_cert_file=str(self.mqtt_tls_cert_file) if self.mqtt_tls_cert_file else None,
            tls_key_file=str(self.mqtt_tls_key_file) if self.mqtt_tls_key_file else None,
        )

    def as_env(self) -> dict[str, str]:
        """These settings as ``SPILLWAY_POOL_*`` variables, for the processes it starts.

        The MQTT password is included in clear (a replica needs it): put the result only
        into a child process's environment, never into a log or a manifest."""
        env: dict[str, str] = {}
        for name, value in self.model_dump(exclude_none=True).items():
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            env[ENV_PREFIX + name.upper()] = (
                str(value).lower() if isinstance(value, bool) else str(value)
            )
        return env
