"""The agent's settings: one ``EdgeSettings`` built in ``main`` and passed down.

Values come from keyword arguments (the CLI's options) first, then from environment
variables prefixed ``SPILLWAY_EDGE_`` (``SPILLWAY_EDGE_DEVICE_ID=dev-1``; ``labels`` as a
JSON object). Nothing here is read at import time and nothing here opens a connection.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from protocol.mqtt import MqttSettings
from protocol.topics import DEFAULT_ROOT, validate_device_id

MAX_LABELS = 64


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

    @model_validator(mode="before")
    @classmethod
    def _fill_state_dir(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("state_dir") in (None, ""):
            device_id = data.get("device_id")
            if isinstance(device_id, str):
                data = {**data, "state_dir": default_state_dir(device_id)}
        return data

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
        )
