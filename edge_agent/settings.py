"""The agent's settings: one ``EdgeSettings`` built in ``main`` and passed down.

Values come from keyword arguments (the CLI's options) first, then from environment
variables prefixed ``SPILLWAY_EDGE_`` (``SPILLWAY_EDGE_DEVICE_ID=dev-1``; ``labels`` as a
JSON object). Nothing here is read at import time and nothing here opens a connection.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from edge_agent.outbox import FullPolicy
from protocol.mqtt import MqttSettings
from protocol.topics import DEFAULT_ROOT, validate_device_id
from protocol.transfer import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES

MAX_LABELS = 64
DEFAULT_VARIANT = "int8-onnx"
DEV_PUBLIC_KEY = Path("keys/signing.key.pub")
"""Where ``spillway models build`` puts the dev public key, relative to the model dir."""


def default_state_dir(device_id: str) -> Path:
    """Where a device keeps its state when ``state_dir`` is not given."""
    return Path("var") / "agent" / device_id


class EdgeSettings(BaseSettings):
    """Everything one edge agent process needs to know at start."""

    model_config = SettingsConfigDict(
        env_prefix="SPILLWAY_EDGE_",
        extra="forbid",
        frozen=True,
        validate_default=True,
        use_attribute_docstrings=True,
    )

    device_id: str
    """This device's id; one topic level, 1-64 of letters, digits, '_', '.', '-'. Required."""
    hardware_class: str = Field(default="jetson-orin-nano", min_length=1, max_length=64)
    """What kind of board this is; the controller schedules by it."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Free-form ``key: value`` tags announced in Hello (at most 64)."""
    mqtt_host: str = "127.0.0.1"
    """Broker host name or address."""
    mqtt_port: int = Field(default=1883, ge=1, le=65535)
    """Broker TCP port."""
    mqtt_tls_ca_file: Path | None = None
    """CA certificate that signed the broker's certificate; None = plain TCP."""
    mqtt_tls_cert_file: Path | None = None
    """This device's client certificate (CN = device id); None = no client certificate."""
    mqtt_tls_key_file: Path | None = None
    """Private key of ``mqtt_tls_cert_file``."""
    mqtt_username: str | None = Field(default=None, min_length=1)
    """Username for password authentication; None with ``mqtt_password`` set: the device
    id (the broker's ACL expects username = device id)."""
    mqtt_password: SecretStr | None = None
    """This device's password (``spillway certs mqtt-user <device-id>``), from the
    environment (``SPILLWAY_EDGE_MQTT_PASSWORD``); None: no password (anonymous, or the
    client certificate names the device). Never logged."""
    keepalive_s: int = Field(default=10, ge=1, le=65535)
    """MQTT keepalive in seconds; the broker sends the Last Will after 1.5x this of silence."""
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    """Seconds between heartbeats (QoS 0; skipped and counted while disconnected)."""
    telemetry_interval_s: float = Field(default=10.0, gt=0)
    """Seconds between telemetry samples (QoS 0; skipped and counted while disconnected)."""
    state_dir: Path
    """Directory for the boot counter and the applied desired state.

    Defaults to ``var/agent/<device_id>`` (relative to the working directory)."""
    topic_root: str = Field(default=DEFAULT_ROOT, min_length=1)
    """First levels of every topic, e.g. ``spillway/v1``."""
    session_expiry_s: int = Field(default=3600, ge=0)
    """Seconds the broker keeps this device's session (subscription, queued QoS 1) while it
    is away; 0 ends the session at disconnect."""
    reconnect_backoff_max_s: float = Field(default=10.0, gt=0)
    """Upper bound in seconds of the jittered wait between reconnect attempts."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Threshold of the JSON logs written to stderr."""

    # -- local serving (on only when model_dir is given) -----------------------------

    model_dir: Path | None = None
    """Folder of published variants (``<model_dir>/<variant>/manifest.json``). None: the agent
    serves nothing (presence, heartbeat and desired state only)."""
    model_variant: str = Field(default=DEFAULT_VARIANT, min_length=1, max_length=64)
    """Which variant under ``model_dir`` to load and serve."""
    trusted_key_file: Path | None = None
    """PEM Ed25519 public key that manifests must be signed with. None: the dev build layout,
    ``<model_dir>/keys/signing.key.pub``."""
    desired_key_files: tuple[Path, ...] = ()
    """PEM Ed25519 public keys desired state must be signed with: the controller's
    (``<desired_signing_key_path or signing_key_path>.pub``), several during a key rotation;
    read at each message. Empty: ``trusted_key_file`` when set (the controller that signs
    manifests signs desired state with the same key by default)."""
    allow_unsigned_desired: bool = False
    """Development only: apply desired state without checking its signature. Off (the
    default): unsigned, unknown-key, other-device or altered desired state is rejected,
    counted and reported; with no desired key at all every desired state is rejected."""
    intra_op_threads: int = Field(default=0, ge=0, le=256)
    """ONNX Runtime intra-op threads; 0 lets ORT pick (one per physical core)."""
    http_host: str = "127.0.0.1"
    """Address the local HTTP ingress binds; localhost keeps it on the device."""
    http_port: int | None = Field(default=8470, ge=0, le=65535)
    """Port of the local HTTP ingress (0: any free port). None: no HTTP ingress."""
    mqtt_ingress: bool = True
    """Answer ``InferRequest`` on the device's ``infer`` topic."""
    max_batch_size: int = Field(default=32, ge=1, le=1024)
    """Most texts in one model call (the adaptive limit's ceiling)."""
    min_batch_size: int = Field(default=1, ge=1, le=1024)
    """Where the adaptive batch limit starts and the least it shrinks to."""
    max_queue_delay_ms: float = Field(default=2.0, ge=0)
    """How long, in ms, the oldest queued request waits for others to fill its batch."""
    max_queue_items: int = Field(default=1024, ge=1)
    """Texts waiting beyond this are rejected at once (``overloaded``, HTTP 429)."""
    latency_budget_ms: float = Field(default=150.0, gt=0)
    """Per-batch model latency, in ms, the adaptive batch limit keeps under."""
    outbox_max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """Result payload bytes the outbox keeps at most before its full policy applies."""
    outbox_max_age_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    """Seconds an unacknowledged result is kept; older ones are dropped and counted."""
    outbox_full_policy: FullPolicy = FullPolicy.DROP_OLDEST
    """``drop_oldest`` (counted) or ``reject_new`` (the request is answered ``error``)."""
    outbox_synchronous: Literal["full", "normal"] = "full"
    """SQLite ``synchronous`` of the outbox: ``full`` fsyncs every commit (survives power
    loss); ``normal`` survives a killed process but not a power cut, and commits faster."""
    uplink_max_batch_bytes: int = Field(default=192 * 1024, ge=4096)
    """Most record bytes in one ``ResultBatch`` (the controller's default payload cap is
    256 KiB); a single larger record still goes alone."""
    uplink_inflight_records: int = Field(default=2000, ge=1)
    """Records published and not yet acknowledged at most (flow control)."""
    uplink_resend_after_s: float = Field(default=15.0, gt=0)
    """Seconds without a ``ResultAck`` after which a published record is sent again."""
    slo_ms: float = Field(default=250.0, gt=0)
    """Latency objective, in ms, of a request without its own deadline; the overflow policy
    offloads when the predicted local wait would miss it."""
    offload_enabled: bool = True
    """Offload to the cloud pool at all (still only while it says it is accepting)."""
    offload_enter_ratio: float = Field(default=1.0, gt=0)
    """Start overflowing when predicted local wait >= this x ``slo_ms``."""
    offload_exit_ratio: float = Field(default=0.6, gt=0)
    """Stop overflowing when predicted local wait <= this x ``slo_ms`` (hysteresis)."""
    offload_rate_per_s: float = Field(default=50.0, ge=0)
    """Offloaded requests per second at most (token bucket refill)."""
    offload_burst: int = Field(default=20, ge=1)
    """Offloads allowed back to back before the rate cap bites (token bucket size)."""
    offload_policy_fraction: float = Field(default=0.0, ge=0, le=1)
    """Fraction of requests sent to the cloud by policy (e.g. quality sampling)."""
    cloud_timeout_ms: float = Field(default=2000.0, gt=0)
    """How long, in ms, an offloaded request waits for the pool before it is served locally."""
    cloud_cooldown_s: float = Field(default=10.0, ge=0)
    """Longest time, in seconds, the cloud is considered unavailable after a timeout or a
    refusal (the cool-down doubles from ``cloud_cooldown_min_s`` while failures go on)."""
    cloud_cooldown_min_s: float = Field(default=1.0, ge=0)
    """The first cool-down after the pool answered: a pool slow for a moment is tried
    again soon."""

    # -- model delivery (issue 4) ---------------------------------------------------------

    model_chunk_bytes: int = Field(default=DEFAULT_CHUNK_BYTES, ge=1024, le=MAX_CHUNK_BYTES)
    """Bytes asked for per chunk request when pulling an artifact (the controller's cap is
    ``transfer_max_chunk_bytes``; the default keeps a frame within a 1 MiB broker packet)."""
    model_chunk_window: int = Field(default=8, ge=1, le=64)
    """Chunk requests in flight at once per download."""
    model_chunk_timeout_s: float = Field(default=10.0, gt=0)
    """Seconds to wait for a chunk's answer before asking again."""
    model_chunk_attempts: int = Field(default=8, ge=1)
    """Unanswered requests for one chunk (while connected) before the download fails as
    temporary; it resumes from the verified offset when the desired state comes again."""
    model_progress_fsync_bytes: int = Field(default=8 * 1024 * 1024, ge=1)
    """Verified download bytes between two durable resume points (fsync of the partial
    file, then of the progress record): fewer fsyncs on a shared disk, and at most this
    many bytes fetched again after a crash or a kill."""
    model_listen_first_s: float = Field(default=0.1, ge=0, le=10)
    """After subscribing to an artifact's broadcast, seconds to only listen before asking:
    a device joining a download that others lead follows it from where it is."""
    model_progress_interval_s: float = Field(default=1.0, ge=0)
    """Seconds between download progress reports at most (one is also sent every 10 %)."""

    @model_validator(mode="before")
    @classmethod
    def _fill_state_dir(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("state_dir") in (None, ""):
            device_id = data.get("device_id")
            if isinstance(device_id, str):
                data = {**data, "state_dir": default_state_dir(device_id)}
        return data

    @model_validator(mode="after")
    def _serving_bounds_agree(self) -> EdgeSettings:
        if self.min_batch_size > self.max_batch_size:
            raise ValueError(
                f"min_batch_size ({self.min_batch_size}) > max_batch_size ({self.max_batch_size})"
            )
        if self.offload_exit_ratio > self.offload_enter_ratio:
            raise ValueError("offload_exit_ratio must be <= offload_enter_ratio (hysteresis)")
        return self

    @property
    def serving(self) -> bool:
        """Whether this agent serves inference (a model dir was given)."""
        return self.model_dir is not None

    def variant_dir(self) -> Path:
        if self.model_dir is None:
            raise ValueError("no model_dir: this agent does not serve")
        return self.model_dir / self.model_variant

    def public_key_file(self) -> Path:
        if self.trusted_key_file is not None:
            return self.trusted_key_file
        if self.model_dir is None:
            raise ValueError("no model_dir and no trusted_key_file")
        return self.model_dir / DEV_PUBLIC_KEY

    def desired_keys(self) -> tuple[Path, ...]:
        """The key files desired-state signatures are checked against."""
        if self.desired_key_files:
            return self.desired_key_files
        return () if self.trusted_key_file is None else (self.trusted_key_file,)

    @field_validator("device_id")
    @classmethod
    def _device_id_fits_topic(cls, value: str) -> str:
        return validate_device_id(value)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("labels")
    @classmethod
    def _labels_bounded(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > MAX_LABELS:
            raise ValueError(f"at most {MAX_LABELS} labels, got {len(value)}")
        for key, item in value.items():
            if not key or len(key) > 64 or len(item) > 256:
                raise ValueError(f"label {key!r}: key must be 1-64 and value at most 256 chars")
        return value

    def mqtt(self) -> MqttSettings:
        """Connection settings for ``protocol.mqtt.MqttClient``; the client id is the device id."""
        return MqttSettings(
            host=self.mqtt_host,
            port=self.mqtt_port,
            client_id=self.device_id,
            keepalive_s=self.keepalive_s,
            session_expiry_s=self.session_expiry_s,
            backoff_max_s=self.reconnect_backoff_max_s,
            tls_ca_file=_str_or_none(self.mqtt_tls_ca_file),
            tls_cert_file=_str_or_none(self.mqtt_tls_cert_file),
            tls_key_file=_str_or_none(self.mqtt_tls_key_file),
            username=self.mqtt_username or (self.device_id if self.mqtt_password else None),
            password=self.mqtt_password.get_secret_value() if self.mqtt_password else None,
        )


def _str_or_none(path: Path | None) -> str | None:
    return None if path is None else str(path)
