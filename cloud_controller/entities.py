"""The controller's records: one SQLModel family per entity.

Tables (``table=True``) are what the database holds; ``*Public`` models are what the REST
API returns; ``*Update`` models are what a client may send (so it can never set ids,
generations or timestamps). The schema itself is owned by the Alembic migrations in
``cloud_controller.migrations``; ``tests/controller/test_migrations.py`` checks that these
tables and the migrations agree. This module knows nothing of MQTT or HTTP.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from pydantic import ConfigDict
from sqlalchemy.engine import Dialect
from sqlmodel import Field, SQLModel

from protocol.messages import ApplyOutcome, DeviceStatus


class UtcDateTime(sa.types.TypeDecorator[datetime]):
    """A timestamp stored in UTC and always read back timezone-aware (SQLite drops the zone)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the controller stores UTC only")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# BIGINT autoincrement on PostgreSQL; SQLite only autoincrements an INTEGER PRIMARY KEY.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


# -- devices ----------------------------------------------------------------------------


class DeviceBase(SQLModel):
    """What a device announces about itself in its Hello."""

    hardware_class: str = Field(max_length=64, index=True)
    labels: dict[str, str] = Field(default_factory=dict, sa_type=sa.JSON)
    agent_version: str = Field(max_length=32)
    capabilities: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    boot_epoch: int = Field(sa_type=sa.BigInteger)
    keepalive_s: int


class Device(DeviceBase, table=True):
    """One registered device. Only the MQTT bridge writes it."""

    __tablename__ = "devices"

    id: str = Field(primary_key=True, max_length=64)
    status: DeviceStatus = Field(sa_type=sa.String(16), index=True)
    first_seen: datetime = Field(sa_type=UtcDateTime)
    last_seen: datetime = Field(sa_type=UtcDateTime)


class DeviceLabel(SQLModel, table=True):
    """One ``key=value`` label of a device: the index that label filters query.

    ``Device.labels`` stays the record of what the device announced; both are written
    in the same transaction by ``ingest.register``.
    """

    __tablename__ = "device_labels"
    __table_args__ = (sa.Index("ix_device_labels_key_value", "key", "value"),)

    device_id: str = Field(
        primary_key=True, max_length=64, foreign_key="devices.id", ondelete="CASCADE"
    )
    key: str = Field(primary_key=True, sa_type=sa.Text)
    value: str = Field(sa_type=sa.Text)


# -- desired state ------------------------------------------------------------------------


class DesiredBase(SQLModel):
    policy: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    """What the device should run; opaque to this module."""


class DesiredUpdate(DesiredBase):
    """Body of ``PUT /api/v1/devices/{id}/desired``; unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]


class DeviceDesired(DesiredBase, table=True):
    """The current desired state of one device; ``generation`` only ever grows."""

    __tablename__ = "desired_states"

    device_id: str = Field(
        primary_key=True, max_length=64, foreign_key="devices.id", ondelete="CASCADE"
    )
    generation: int = Field(sa_type=sa.BigInteger)
    updated_at: datetime = Field(sa_type=UtcDateTime)


class DesiredSet(DesiredBase):
    """Answer to a desired-state update: the generation it was stored (and published) as."""

    device_id: str
    generation: int


class DesiredPublic(DesiredBase):
    device_id: str
    generation: int
    updated_at: datetime


# -- reported state -----------------------------------------------------------------------


class ReportedBase(SQLModel):
    observed_generation: int = Field(sa_type=sa.BigInteger)
    outcome: ApplyOutcome = Field(sa_type=sa.String(16))
    policy: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    error: str | None = Field(default=None, sa_type=sa.Text)


class DeviceReported(ReportedBase, table=True):
    """The last state a device reported; written only by the MQTT bridge."""

    __tablename__ = "reported_states"

    device_id: str = Field(
        primary_key=True, max_length=64, foreign_key="devices.id", ondelete="CASCADE"
    )
    boot_epoch: int = Field(sa_type=sa.BigInteger)
    reported_at: datetime = Field(sa_type=UtcDateTime)


class ReportedPublic(ReportedBase):
    reported_at: datetime


# -- telemetry ----------------------------------------------------------------------------


class TelemetryBase(SQLModel):
    ts: datetime = Field(sa_type=UtcDateTime)
    """When the device took the sample (the device's clock)."""
    metrics: dict[str, float] = Field(default_factory=dict, sa_type=sa.JSON)


class TelemetrySample(TelemetryBase, table=True):
    """One telemetry sample; only the newest ``telemetry_history`` per device are kept."""

    __tablename__ = "telemetry_samples"
    __table_args__ = (sa.Index("ix_telemetry_samples_device_id_id", "device_id", "id"),)

    id: int | None = Field(default=None, primary_key=True, sa_type=BigId)
    device_id: str = Field(max_length=64, foreign_key="devices.id", ondelete="CASCADE")
    received_at: datetime = Field(sa_type=UtcDateTime)
    """When the controller stored it (the controller's clock)."""


class TelemetryPublic(TelemetryBase):
    received_at: datetime


# -- the device as the API shows it -----------------------------------------------------


class DevicePublic(DeviceBase):
    id: str
    status: DeviceStatus
    first_seen: datetime
    last_seen: datetime
    staleness_age_s: float
    """Seconds since the controller last heard from the device."""
    stale: bool
    """Online, but silent for longer than ``stale_after_s``."""
    desired: DesiredPublic | None = None
    reported: ReportedPublic | None = None
    latest_telemetry: TelemetryPublic | None = None


class DevicePage(SQLModel):
    items: list[DevicePublic]
    total: int
    page: int
    page_size: int


# -- results ------------------------------------------------------------------------------


class ResultBase(SQLModel):
    """One served request as a device reported it (``protocol.inference.ResultRecord``)."""

    device_id: str = Field(max_length=64)
    boot_epoch: int = Field(sa_type=sa.BigInteger)
    seq: int = Field(sa_type=sa.BigInteger)
    """With ``device_id`` and ``boot_epoch`` the record's identity; a redelivery is a no-op."""
    request_id: str = Field(max_length=128, index=True)
    status: str = Field(max_length=32)
    tier: str = Field(max_length=16)
    variant: str | None = Field(default=None, sa_type=sa.Text)
    offload_reason: str | None = Field(default=None, max_length=16)
    queued_ms: float
    latency_ms: float
    served_at: datetime = Field(sa_type=UtcDateTime)
    """When the device answered (the device's clock)."""
    received_at: datetime = Field(sa_type=UtcDateTime)
    """When the controller stored it (the controller's clock); retention counts from here."""


class Result(ResultBase, table=True):
    """A stored result; written only by the MQTT bridge, deleted only by its retention.

    Embeddings are kept as the raw little-endian float32 bytes the device sent (the
    base64 block decoded, a quarter smaller), ``embedding_count`` rows of ``embedding_dim``.
    """

    __tablename__ = "results"
    __table_args__ = (
        sa.UniqueConstraint(
            "device_id", "boot_epoch", "seq", name="uq_results_device_id_boot_epoch_seq"
        ),
        sa.Index("ix_results_served_at_seq", "served_at", "seq"),
        sa.Index("ix_results_device_id_served_at_seq", "device_id", "served_at", "seq"),
        sa.Index("ix_results_received_at", "received_at"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=BigId)
    embedding_count: int | None = None
    embedding_dim: int | None = None
    embeddings: bytes | None = Field(default=None, sa_type=sa.LargeBinary)


class ResultPublic(ResultBase):
    embeddings: list[list[float]] | None = None
    """``embedding_count`` rows of ``embedding_dim`` floats; None when the request produced
    none or the caller asked to leave them out."""


class ResultPage(SQLModel):
    items: list[ResultPublic]
    total: int
    page: int
    page_size: int


# -- model registry -----------------------------------------------------------------------


class VersionState(StrEnum):
    """Where a model version is in its life: detected -> validating -> ready | rejected;
    a ready version may later be deprecated."""

    DETECTED = "detected"
    VALIDATING = "validating"
    READY = "ready"
    REJECTED = "rejected"
    DEPRECATED = "deprecated"


class VersionSource(StrEnum):
    UPLOAD = "upload"
    WATCH = "watch"


class Model(SQLModel, table=True):
    """A model by name (``sentence-transformers/all-MiniLM-L6-v2``); its versions hang off it."""

    __tablename__ = "models"
    __table_args__ = (sa.UniqueConstraint("name", name="uq_models_name"),)

    id: int | None = Field(default=None, primary_key=True, sa_type=BigId)
    name: str = Field(max_length=128)
    created_at: datetime = Field(sa_type=UtcDateTime)


class ModelVersion(SQLModel, table=True):
    """One version of a model; only ``ready`` versions are served and assigned."""

    __tablename__ = "model_versions"
    __table_args__ = (
        sa.UniqueConstraint("model_id", "version", name="uq_model_versions_model_id_version"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=BigId)
    model_id: int = Field(sa_type=BigId, foreign_key="models.id", ondelete="CASCADE")
    version: str = Field(max_length=64)
    state: VersionState = Field(sa_type=sa.String(16))
    reason: str | None = Field(default=None, sa_type=sa.Text)
    """Why it was rejected or deprecated."""
    source: VersionSource = Field(sa_type=sa.String(16))
    created_at: datetime = Field(sa_type=UtcDateTime)
    updated_at: datetime = Field(sa_type=UtcDateTime)


class VariantBase(SQLModel):
    variant: str = Field(max_length=64)
    precision: str = Field(max_length=16)
    runtime: str = Field(max_length=32)
    artifact_sha256: str = Field(max_length=64)
    """The artifact's identity in the store and on the wire (``ChunkRequest``)."""
    size_bytes: int = Field(sa_type=sa.BigInteger)
    tokenizer_sha256: str = Field(max_length=64, index=True)
    """The tokenizer the variant needs; served by the chunk server like the artifact."""
    release: int = Field(sa_type=sa.BigInteger)
    """The manifest's release counter (monotonic per model and variant)."""
    manifest: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    """The signed manifest exactly as ``models.manifest.sign`` produced it."""
    created_at: datetime = Field(sa_type=UtcDateTime)


class ModelVariant(VariantBase, table=True):
    """One built artifact of a version (``int8-onnx``, ...), stored by its sha256."""

    __tablename__ = "model_variants"
    __table_args__ = (
        sa.UniqueConstraint("version_id", "variant", name="uq_model_variants_version_id_variant"),
        sa.UniqueConstraint("artifact_sha256", name="uq_model_variants_artifact_sha256"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=BigId)
    version_id: int = Field(sa_type=BigId, foreign_key="model_versions.id", ondelete="CASCADE")
    artifact_path: str = Field(sa_type=sa.Text)
    """Where the artifact lies, relative to ``CloudSettings.artifact_dir``."""


class VariantPublic(VariantBase):
    pass


class VersionPublic(SQLModel):
    model: str
    version: str
    state: VersionState
    reason: str | None
    source: VersionSource
    created_at: datetime
    updated_at: datetime
    variants: list[VariantPublic]


class ModelSummary(SQLModel):
    name: str
    created_at: datetime
    current_version: str | None
    """The highest ready version (PEP 440 order); None while there is none."""
    versions: int


class ModelPublic(SQLModel):
    name: str
    created_at: datetime
    current_version: str | None
    versions: list[VersionPublic]
    """Newest first."""


class ModelPage(SQLModel):
    items: list[ModelSummary]
    total: int
    page: int
    page_size: int


class ModelAssign(SQLModel):
    """Body of ``PUT /api/v1/devices/{id}/model``."""

    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]

    name: str = Field(min_length=1, max_length=128)
    version: str = Field(min_length=1, max_length=64)
    variant: str = Field(min_length=1, max_length=64)


# -- alerts -------------------------------------------------------------------------------


class AlertBase(SQLModel):
    kind: str = Field(max_length=32, index=True)
    """What happened, e.g. ``model_rejected``."""
    subject: str = Field(sa_type=sa.Text)
    """What it happened to, e.g. ``name@version`` or a dropped folder."""
    message: str = Field(sa_type=sa.Text)
    created_at: datetime = Field(sa_type=UtcDateTime)


class Alert(AlertBase, table=True):
    """Something an operator should look at; rows are only ever appended."""

    __tablename__ = "alerts"

    id: int | None = Field(default=None, primary_key=True, sa_type=BigId)


class AlertPublic(AlertBase):
    id: int


class AlertPage(SQLModel):
    items: list[AlertPublic]
    total: int
    page: int
    page_size: int
