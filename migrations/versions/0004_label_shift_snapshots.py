"""label shift on monitoring snapshots: the estimated class prior and its interval, the served mix it explains,
the label-free recall's interval, and which feedback the measured recalls used

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = (
    ("n_conversations", sa.Integer()),
    ("estimated_prior", sa.JSON()),
    ("estimated_prior_lower", sa.JSON()),
    ("estimated_prior_upper", sa.JSON()),
    ("prior_shift_detected", sa.Boolean()),
    ("expected_shares", sa.JSON()),
    ("mix_unexplained_share", sa.Float()),
    ("mix_p_value", sa.Float()),
    ("estimated_recall_lower", sa.JSON()),
    ("estimated_recall_upper", sa.JSON()),
    ("minority_recall_estimated_lower", sa.Float()),
    ("minority_recall_estimated_upper", sa.Float()),
    ("measured_source", sa.String(length=16)),
    ("minority_recall_measured_upper", sa.Float()),
    ("labelled_source", sa.String(length=16)),
)


def upgrade() -> None:
    with op.batch_alter_table("monitoring_snapshots") as batch:
        for name, column_type in COLUMNS:
            batch.add_column(sa.Column(name, column_type, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("monitoring_snapshots") as batch:
        for name, _ in reversed(COLUMNS):
            batch.drop_column(name)
