"""shadow predictions: live turns scored again by a challenger in the background, linked to their live prediction

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "shadow_predictions",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("live_prediction_id", sa.Uuid(), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("label", sa.String(length=32), nullable=False),
        sa.Column("label_index", sa.Integer(), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("probabilities", sa.JSON(), nullable=False),
        sa.Column("sentiment", sa.String(length=32), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["live_prediction_id"],
            ["predictions.id"],
            name=op.f("fk_shadow_predictions_live_prediction_id_predictions"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["model_version"],
            ["model_versions.version"],
            name=op.f("fk_shadow_predictions_model_version_model_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_shadow_predictions")),
    )
    with op.batch_alter_table("shadow_predictions", schema=None) as batch_op:
        batch_op.create_index(
            "uq_shadow_predictions_live_prediction_id_model_version",
            ["live_prediction_id", "model_version"],
            unique=True,
        )
        batch_op.create_index(
            "ix_shadow_predictions_model_version_created_at", ["model_version", "created_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("shadow_predictions", schema=None) as batch_op:
        batch_op.drop_index("ix_shadow_predictions_model_version_created_at")
        batch_op.drop_index("uq_shadow_predictions_live_prediction_id_model_version")
    op.drop_table("shadow_predictions")
