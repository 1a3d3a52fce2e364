"""The controller's settings: one ``CloudSettings`` built in ``main``/the CLI and passed down.

Values come from keyword arguments (the CLI's options) first, then from environment
variables prefixed ``SPILLWAY_`` (``SPILLWAY_HTTP_PORT=8080``); the database URL is also
read from plain ``DATABASE_URL``. Nothing here is read at import time, and nothing here
touches the disk or the network.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from protocol.codec import DEFAULT_MAX_BYTES
from protocol.mqtt import MqttSettings
from protocol.topics import DEFAULT_ROOT


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
    topic_root: str = Field(default=DEFAULT_ROOT, min_length=1)
    """First levels of every topic, e.g. ``spillway/v1``."""
    stale_after_s: float = Field(default=30.0, gt=0)
    """Seconds since the last message after which an online device is flagged stale."""
    max_page_size: int = Field(default=200, ge=1)
    """Largest ``page_size`` a list request may ask for; larger requests get a 422."""
    max_payload_bytes: int = Field(default=DEFAULT_MAX_BYTES, ge=1)
    """Largest inbound MQTT payload in bytes; larger ones are rejected as ``oversized``."""
    telemetry_history: int = Field(default=100, ge=1)
    """Telemetry samples kept per device; older ones are deleted as new ones arrive."""
    ingest_queue_max: int = Field(default=10_000, ge=1)
    """Accepted messages that may wait for the database; beyond it new ones are dropped and
    counted as ``queue_full``."""
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

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    def mqtt(self) -> MqttSettings:
        """Connection settings for the bridge's ``protocol.mqtt.MqttClient``."""
        return MqttSettings(
            host=self.mqtt_host,
            port=self.mqtt_port,
            client_id=self.mqtt_client_id,
            keepalive_s=self.mqtt_keepalive_s,
            session_expiry_s=self.mqtt_session_expiry_s,
            backoff_max_s=self.mqtt_reconnect_backoff_max_s,
        )
