"""Rollouts: a rollout, its waves and its devices (``cloud_controller.rollout_entities``).

Revision ID: 0006
Revises: 0003 (re-chained after 0004/0005 when merged)
Create Date: 2025-03-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "rollouts",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("model_name", sa.String(128), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("target", sa.JSON(), nullable=False),
        sa.Column("waves_config", sa.JSON(), nullable=False),
        sa.Column("gates", sa.JSON(), nullable=False),
        sa.Column("on_gate_failure", sa.String(16), nullable=False),
        sa.Column("quality_sample_share", sa.Float(), nullable=False),
        sa.Column("current_wave", sa.Integer(), nullable=False),
        sa.Column("final_state", sa.String(16), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.Column("finished_at", _TS, nullable=True),
    )
    op.create_index("ix_rollouts_state", "rollouts", ["state"])

    op.create_table(
        "rollout_waves",
        sa.Column(
            "rollout_id",
            _ID,
            sa.ForeignKey("rollouts.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("index", sa.Integer(), primary_key=True),
        sa.Column("canary", sa.Boolean(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("started_at", _TS, nullable=True),
        sa.Column("settled_at", _TS, nullable=True),
        sa.Column("evaluated_at", _TS, nullable=True),
        sa.Column("gate_verdict", sa.String(16), nullable=True),
        sa.Column("gate_results", sa.JSON(), nullable=False),
    )

    op.create_table(
        "rollout_devices",
        sa.Column(
            "rollout_id",
            _ID,
            sa.ForeignKey("rollouts.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("hardware_class", sa.String(64), nullable=False),
        sa.Column("variant", sa.String(64), nullable=True),
        sa.Column("artifact_sha256", sa.String(64), nullable=True),
        sa.Column("state", sa.String(24), nullable=False),
        sa.Column("previous", sa.JSON(), nullable=True),
        sa.Column("generation", sa.BigInteger(), nullable=True),
        sa.Column("activated_at", _TS, nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("updated_at", _TS, nullable=False),
    )
    op.create_index("ix_rollout_devices_device_id", "rollout_devices", ["device_id"])


def downgrade() -> None:
    op.drop_index("ix_rollout_devices_device_id", table_name="rollout_devices")
    op.drop_table("rollout_devices")
    op.drop_table("rollout_waves")
    op.drop_index("ix_rollouts_state", table_name="rollouts")
    op.drop_table("rollouts")
