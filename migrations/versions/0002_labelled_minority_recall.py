"""minority recall's confidence half-width, and minority recall over the newest labelled predictions, on
monitoring snapshots

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 19:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = (
    ("minority_recall_measured_halfwidth", sa.Float()),
    ("labelled_horizon", sa.Integer()),
    ("minority_recall_labelled", sa.Float()),
    ("minority_recall_labelled_estimated", sa.Float()),
    ("minority_recall_labelled_halfwidth", sa.Float()),
)


def upgrade() -> None:
    with op.batch_alter_table("monitoring_snapshots") as batch:
        for name, column_type in COLUMNS:
            batch.add_column(sa.Column(name, column_type, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("monitoring_snapshots") as batch:
        for name, _ in reversed(COLUMNS):
            batch.drop_column(name)
