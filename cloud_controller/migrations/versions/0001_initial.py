"""Initial schema: devices, their labels, desired and reported state, telemetry.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("hardware_class", sa.String(64), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("agent_version", sa.String(32), nullable=False),
        sa.Column("capabilities", sa.JSON(), nullable=False),
        sa.Column("boot_epoch", sa.BigInteger(), nullable=False),
        sa.Column("keepalive_s", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("first_seen", _TS, nullable=False),
        sa.Column("last_seen", _TS, nullable=False),
    )
    op.create_index("ix_devices_hardware_class", "devices", ["hardware_class"])
    op.create_index("ix_devices_status", "devices", ["status"])

    op.create_table(
        "device_labels",
        sa.Column(
            "device_id",
            sa.String(64),
            sa.ForeignKey("devices.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("key", sa.Text(), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False),
    )
    op.create_index("ix_device_labels_key_value", "device_labels", ["key", "value"])

    op.create_table(
        "desired_states",
        sa.Column(
            "device_id",
            sa.String(64),
            sa.ForeignKey("devices.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.Column("policy", sa.JSON(), nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
    )

    op.create_table(
        "reported_states",
        sa.Column(
            "device_id",
            sa.String(64),
            sa.ForeignKey("devices.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("observed_generation", sa.BigInteger(), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("policy", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("boot_epoch", sa.BigInteger(), nullable=False),
        sa.Column("reported_at", _TS, nullable=False),
    )

    op.create_table(
        "telemetry_samples",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column(
            "device_id",
            sa.String(64),
            sa.ForeignKey("devices.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("ts", _TS, nullable=False),
        sa.Column("received_at", _TS, nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
    )
    op.create_index("ix_telemetry_samples_device_id_id", "telemetry_samples", ["device_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_telemetry_samples_device_id_id", table_name="telemetry_samples")
    op.drop_table("telemetry_samples")
    op.drop_table("reported_states")
    op.drop_table("desired_states")
    op.drop_index("ix_device_labels_key_value", table_name="device_labels")
    op.drop_table("device_labels")
    op.drop_index("ix_devices_status", table_name="devices")
    op.drop_index("ix_devices_hardware_class", table_name="devices")
    op.drop_table("devices")
