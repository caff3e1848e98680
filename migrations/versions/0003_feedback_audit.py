"""the kind of each feedback label: audit (a prediction offered for random labelling) or correction

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KIND = sa.Enum("audit", "correction", name="feedbackkind", native_enum=False, length=16)


def upgrade() -> None:
    # Labels stored before audit sampling existed were all sent to correct mistakes.
    with op.batch_alter_table("feedback", schema=None) as batch_op:
        batch_op.add_column(sa.Column("kind", KIND, nullable=False, server_default="correction"))
        batch_op.create_index("ix_feedback_kind_prediction_id", ["kind", "prediction_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("feedback", schema=None) as batch_op:
        batch_op.drop_index("ix_feedback_kind_prediction_id")
        batch_op.drop_column("kind")
