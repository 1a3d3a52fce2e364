"""The controller's settings: one ``CloudSettings`` built in ``main``/the CLI and passed down.

Values come from keyword arguments (the CLI's options) first, then from environment
variables prefixed ``SPILLWAY_`` (``SPILLWAY_HTTP_PORT=8080``); the database URL is also
read from plain ``DATABASE_URL``. Nothing here is read at import time, and nothing here
touches the disk or the network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from protocol.codec import DEFAULT_MAX_BYTES
from protocol.mqtt import MqttSettings
from protocol.topics import DEFAULT_ROOT
from protocol.transfer import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES
from spillway.preflight import check_mqtt_credentials

ADMIN_TOKEN_MIN_CHARS = 20
"""Shortest ``admin_token`` accepted: a bootstrap secret must not be guessable."""

WATCH_VARIANTS = ("fp32-onnx", "int8-onnx", "fp16-onnx")
"""Variants built from a dropped FP32 ONNX file (a ``.pt`` file gives ``fp32-torchscript``)."""


class CloudSettings(BaseSettings):
    """Everything one controller process needs to know at start."""

    model_config = SettingsConfigDict(
        env_prefix="SPILLWAY_",
        extra="forbid",
        frozen=True,
        validate_default=True,
        validate_by_name=True,
        validate_by_alias=True,
    )

    database_url: str = Field(
        default="sqlite:///var/spillway.db",
        min_length=1,
        validation_alias=AliasChoices("SPILLWAY_DATABASE_URL", "DATABASE_URL"),
    )
    """SQLAlchemy URL (``sqlite:///path`` or ``postgresql+psycopg2://...``); a SQLite file's
    parent directory is created when the engine is built."""
    http_host: str = "127.0.0.1"
    """Address the REST API listens on."""
    http_port: int = Field(default=8000, ge=1, le=65535)
    """TCP port the REST API listens on."""
    mqtt_host: str = "127.0.0.1"
    """Broker host name or address."""
    mqtt_port: int = Field(default=1883, ge=1, le=65535)
    """Broker TCP port."""
    mqtt_client_id: str = Field(default="spillway-controller", min_length=1, max_length=128)
    """MQTT client id; the session (subscriptions, queued QoS 1) is kept under it."""
    mqtt_keepalive_s: int = Field(default=10, ge=1, le=65535)
    """MQTT keepalive in seconds of the controller's own connection."""
    mqtt_session_expiry_s: int = Field(default=3600, ge=0)
    """Seconds the broker keeps the controller's session while it is away."""
    mqtt_reconnect_backoff_max_s: float = Field(default=10.0, gt=0)
    """Upper bound in seconds of the jittered wait between reconnect attempts."""
    mqtt_username: str | None = Field(default=None, min_length=1)
    """Username the controller authenticates with (``spillway certs mqtt-user``); None:
    anonymous, for a development broker only."""
    mqtt_password: SecretStr | None = None
    """Password of ``mqtt_username``; set it from a Secret (``SPILLWAY_MQTT_PASSWORD``),
    never on a command line. Never logged."""
    mqtt_tls_ca_file: Path | None = None
    """CA certificate that signed the broker's certificate; None = plain TCP."""
    mqtt_tls_cert_file: Path | None = None
    """Client certificate for a listener that requires one; None = none."""
    mqtt_tls_key_file: Path | None = None
    """Private key of ``mqtt_tls_cert_file``."""
    topic_root: str = Field(default=DEFAULT_ROOT, min_length=1)
    """First levels of every topic, e.g. ``spillway/v1``."""
    stale_after_s: float = Field(default=30.0, gt=0)
    """Seconds since the last message after which an online device is flagged stale."""
    max_page_size: int = Field(default=200, ge=1)
    """Largest ``page_size`` a list request may ask for; larger requests get a 422."""
    max_payload_bytes: int = Field(default=DEFAULT_MAX_BYTES, ge=1)
    """Largest inbound MQTT payload in bytes; larger ones are rejected as ``oversized``."""
    max_result_payload_bytes: int = Field(default=4 * 1024 * 1024, ge=1)
    """Largest ``ResultBatch`` payload in bytes: one record of a 256-text request with its
    embeddings is about 700 KB, and a record cannot be split, so this is larger."""
    telemetry_history: int = Field(default=100, ge=1)
    """Telemetry samples kept per device; older ones are deleted as new ones arrive."""
    ingest_queue_max: int = Field(default=10_000, ge=1)
    """Accepted heartbeats, telemetry and results that may wait for the database; beyond it
    new ones are dropped and counted as ``queue_full``."""
    ingest_control_queue_max: int = Field(default=10_000, ge=1)
    """Accepted control messages (hello, status, reported) that may wait for the database,
    in a queue of their own that the worker empties first, so they never wait behind a
    backlog of heartbeats and telemetry; beyond it new ones are dropped and counted as
    ``queue_full``."""
    ingest_batch_max: int = Field(default=500, ge=1)
    """Most queued messages the worker applies in one database transaction."""
    ingest_batch_linger_s: float = Field(default=0.02, ge=0)
    """Seconds the worker waits for more messages after the first of a batch (while fewer
    than ``ingest_batch_max`` are queued): fewer, larger commits at moderate load."""
    ingest_retry_s: float = Field(default=30.0, ge=0)
    """Seconds the bridge keeps retrying a message while the database is unreachable
    before dropping it and counting ``storage_error``."""
    results_retention_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    """Seconds a stored result is kept, counted from when the controller received it."""
    results_max_rows: int = Field(default=1_000_000, ge=1)
    """Most results kept; beyond it the oldest are deleted at the next cleanup."""
    results_cleanup_interval_s: float = Field(default=300.0, gt=0)
    """Seconds (of the controller's clock) between two retention cleanups of results."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Threshold of the JSON logs written to stderr."""

    # -- authentication and limits --------------------------------------------------------
    admin_token: SecretStr | None = None
    """An admin API token's secret (``SPILLWAY_ADMIN_TOKEN``, at least 20 characters) that
    the controller makes sure exists at start, to bootstrap a deployment; a revoked one
    stays revoked. None: tokens only come from the CLI or ``POST /api/v1/tokens``."""
    max_request_body_bytes: int = Field(default=1024 * 1024, ge=1)
    """Largest request body in bytes, model uploads aside (their limit follows
    ``max_upload_bytes``); larger ones get a 413 before the body is read."""

    # -- model registry -------------------------------------------------------------------
    artifact_dir: Path = Path("var/artifacts")
    """Content-addressed artifact store (``<dir>/<sha[:2]>/<sha>``); created when needed."""
    signing_key_path: Path = Path("var/keys/signing.key")
    """Ed25519 key (PEM) that signs the manifests of variants built from the watched
    directory; generated once (dev key, public half at ``<path>.pub``) when absent."""
    trusted_keys_dir: Path | None = None
    """Folder of ``*.pub`` Ed25519 public keys (PEM) whose manifests uploads may carry;
    None: only the controller's own key (``signing_key_path``) is trusted."""
    max_upload_bytes: int = Field(default=2 * 1024**3, ge=1)
    """Largest artifact (and tokenizer) in bytes an upload may carry; larger ones get a 413."""
    model_watch_dir: Path | None = None
    """Folder watched for dropped models (``<name>-<version>/`` holding ``model.json`` and a
    ``.onnx`` or ``.pt`` file); None: no watching."""
    model_watch_interval_s: float = Field(default=2.0, gt=0)
    """Seconds between two scans of ``model_watch_dir``; a folder is taken once two scans
    in a row saw the same files (names, sizes, modification times)."""
    model_watch_variants: tuple[str, ...] = WATCH_VARIANTS
    """Variants built from a dropped FP32 ONNX file; ``fp32-onnx`` (the file itself) always is."""
    model_eval_sentences: int = Field(default=1200, ge=10)
    """Held-out sentences the quality gate of a dropped model's variants is measured on."""

    # -- policies -------------------------------------------------------------------------
    desired_signing_key_path: Path | None = None
    """Ed25519 key (PEM) that signs every desired-state message (agents verify it with the
    public half, ``<path>.pub``); generated once when absent. None: ``signing_key_path``."""

    # -- artifact transfer ----------------------------------------------------------------
    transfer_max_chunk_bytes: int = Field(default=DEFAULT_CHUNK_BYTES, ge=1, le=MAX_CHUNK_BYTES)
    """Largest chunk in bytes a device may ask for; larger requests get ``bad_range``. The
    default keeps a frame under EMQX's default 1 MiB packet cap."""
    max_concurrent_transfers: int = Field(default=8, ge=1)
    """Devices that may transfer at once; the next one is answered ``busy``."""
    transfer_active_window_s: float = Field(default=30.0, gt=0)
    """Seconds after its last chunk request during which a device counts as transferring
    (a device that fetched an artifact's last chunk stops counting at once)."""
    transfer_retry_after_ms: int = Field(default=2000, ge=0)
    """``retry_after_ms`` of a ``busy`` answer."""
    transfer_workers: int = Field(default=8, ge=1)
    """Threads that read chunks and publish answers (never paho's network thread)."""
    transfer_queue_max: int = Field(default=256, ge=1)
    """Chunk requests that may wait for a worker; beyond it they are answered ``busy``."""
    transfer_publish_timeout_s: float = Field(default=30.0, gt=0)
    """Seconds a worker waits for the broker's PUBACK of a chunk before giving up on it;
    waiting keeps at most ``transfer_workers`` chunks in memory."""
    transfer_chunk_cache_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    """Bytes of recently served chunks (with their sha256) kept in memory, so that the
    devices of a rollout asking for the same chunk cost one read and one hash; 0 keeps
    none."""

    # -- rollouts -------------------------------------------------------------------------
    rollout_tick_s: float = Field(default=1.0, gt=0)
    """Seconds (wall time) between two steps of the rollout engine; each step reads the
    controller's clock, so waves and gates follow it, not this period."""
    rollout_memory_share: float = Field(default=0.5, gt=0, le=1)
    """Share of a device's announced memory a rollout's variant may take (the fit rule of
    ``cloud_controller.rollouts.choose_variant``)."""
    rollout_memory_overhead: float = Field(default=2.0, ge=1)
    """Memory a variant needs as a multiple of its artifact size (weights, arena,
    activations)."""

    @field_validator("admin_token")
    @classmethod
    def _strong_admin_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < ADMIN_TOKEN_MIN_CHARS:
            raise ValueError(
                f"admin_token must be at least {ADMIN_TOKEN_MIN_CHARS} characters "
                "(e.g. the output of `openssl rand -base64 32`)"
            )
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _mqtt_credentials_complete(self) -> CloudSettings:
        check_mqtt_credentials(
            username=self.mqtt_username,
            password=self.mqtt_password,
            ca_file=self.mqtt_tls_ca_file,
            cert_file=self.mqtt_tls_cert_file,
            key_file=self.mqtt_tls_key_file,
        )
        return self

    def mqtt(self) -> MqttSettings:
        """Connection settings for the bridge's ``protocol.mqtt.MqttClient``."""
        return MqttSettings(
            host=self.mqtt_host,
            port=self.mqtt_port,
            client_id=self.mqtt_client_id,
            keepalive_s=self.mqtt_keepalive_s,
            session_expiry_s=self.mqtt_session_expiry_s,
            backoff_max_s=self.mqtt_reconnect_backoff_max_s,
            username=self.mqtt_username,
            password=self.mqtt_password.get_secret_value() if self.mqtt_password else None,
            tls_ca_file=str(self.mqtt_tls_ca_file) if self.mqtt_tls_ca_file else None,
            tls_cert_file=str(self.mqtt_tls_cert_file) if self.mqtt_tls_cert_file else None,
            tls_key_file=str(self.mqtt_tls_key_file) if self.mqtt_tls_key_file else None,
        )
