"""Results: what devices served, one row per (device_id, boot_epoch, seq).

The unique constraint is what makes a redelivered record a no-op
(``INSERT ... ON CONFLICT DO NOTHING`` on SQLite and PostgreSQL).

Revision ID: 0002
Revises: 0001
Create Date: 2025-02-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "results",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("boot_epoch", sa.BigInteger(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("tier", sa.String(16), nullable=False),
        sa.Column("variant", sa.Text(), nullable=True),
        sa.Column("offload_reason", sa.String(16), nullable=True),
        sa.Column("queued_ms", sa.Float(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("served_at", _TS, nullable=False),
        sa.Column("received_at", _TS, nullable=False),
        sa.Column("embedding_count", sa.Integer(), nullable=True),
        sa.Column("embedding_dim", sa.Integer(), nullable=True),
        sa.Column("embeddings", sa.LargeBinary(), nullable=True),
        sa.UniqueConstraint(
            "device_id", "boot_epoch", "seq", name="uq_results_device_id_boot_epoch_seq"
        ),
    )
    op.create_index("ix_results_request_id", "results", ["request_id"])
    op.create_index("ix_results_served_at_seq", "results", ["served_at", "seq"])
    op.create_index(
        "ix_results_device_id_served_at_seq", "results", ["device_id", "served_at", "seq"]
    )
    op.create_index("ix_results_received_at", "results", ["received_at"])


def downgrade() -> None:
    op.drop_index("ix_results_received_at", table_name="results")
    op.drop_index("ix_results_device_id_served_at_seq", table_name="results")
    op.drop_index("ix_results_served_at_seq", table_name="results")
    op.drop_index("ix_results_request_id", table_name="results")
    op.drop_table("results")
