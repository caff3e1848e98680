"""calls: whole call recordings processed off the request path; their turns as predictions of kind `call`

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-10 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "calls",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "queued",
                "running",
                "done",
                "failed",
                name="callstatus",
                native_enum=False,
                create_constraint=False,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("roles", sa.JSON(), nullable=True),
        sa.Column(
            "context",
            sa.Enum(
                "causal", "bidirectional", name="contextmode", native_enum=False, create_constraint=False, length=16
            ),
            nullable=False,
        ),
        sa.Column("audio_path", sa.String(length=1024), nullable=False),
        sa.Column("audio_bytes", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("owner", sa.String(length=128), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_calls")),
    )
    with op.batch_alter_table("calls", schema=None) as batch_op:
        batch_op.create_index("ix_calls_status_created_at", ["status", "created_at"], unique=False)
        batch_op.create_index("ix_calls_status_lease_expires_at", ["status", "lease_expires_at"], unique=False)
    with op.batch_alter_table("predictions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("call_id", sa.Uuid(), nullable=True))
        batch_op.add_column(sa.Column("start_s", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("end_s", sa.Float(), nullable=True))
        batch_op.create_foreign_key(
            op.f("fk_predictions_call_id_calls"), "calls", ["call_id"], ["id"], ondelete="SET NULL"
        )
        batch_op.create_index("ix_predictions_call_id", ["call_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("predictions", schema=None) as batch_op:
        batch_op.drop_index("ix_predictions_call_id")
        batch_op.drop_constraint(op.f("fk_predictions_call_id_calls"), type_="foreignkey")
        batch_op.drop_column("end_s")
        batch_op.drop_column("start_s")
        batch_op.drop_column("call_id")
    with op.batch_alter_table("calls", schema=None) as batch_op:
        batch_op.drop_index("ix_calls_status_lease_expires_at")
        batch_op.drop_index("ix_calls_status_created_at")
    op.drop_table("calls")
