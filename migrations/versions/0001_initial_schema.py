"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-23 00:05:37.276761
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("key_sha256", sa.String(length=64), nullable=False),
        sa.Column("role", sa.Enum("predict", "admin", name="role", native_enum=False, length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_sha256", name=op.f("uq_api_keys_key_sha256")),
        sa.UniqueConstraint("name", name=op.f("uq_api_keys_name")),
    )
    op.create_table(
        "model_versions",
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "candidate",
                "champion",
                "retired",
                "rejected",
                name="modelstatus",
                native_enum=False,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("parent_version", sa.String(length=64), nullable=True),
        sa.Column("artifact_path", sa.String(length=1024), nullable=False),
        sa.Column("artifact_sha256", sa.String(length=64), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("recipe", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("promoted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("rejection_reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["parent_version"],
            ["model_versions.version"],
            name=op.f("fk_model_versions_parent_version_model_versions"),
        ),
        sa.PrimaryKeyConstraint("version", name=op.f("pk_model_versions")),
    )
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.create_index(
            "uq_model_versions_one_champion",
            ["status"],
            unique=True,
            sqlite_where=sa.text("status = 'champion'"),
            postgresql_where=sa.text("status = 'champion'"),
        )

    op.create_table(
        "monitoring_snapshots",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("window_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("n_predictions", sa.Integer(), nullable=False),
        sa.Column("n_labelled", sa.Integer(), nullable=False),
        sa.Column("class_shares", sa.JSON(), nullable=False),
        sa.Column("reference_shares", sa.JSON(), nullable=False),
        sa.Column("majority_share", sa.Float(), nullable=False),
        sa.Column("drift_score", sa.Float(), nullable=True),
        sa.Column("drift_p_value", sa.Float(), nullable=True),
        sa.Column("drift_detected", sa.Boolean(), nullable=False),
        sa.Column("embedding_drift", sa.Float(), nullable=True),
        sa.Column("measured_recall", sa.JSON(), nullable=False),
        sa.Column("estimated_recall", sa.JSON(), nullable=False),
        sa.Column("minority_recall_measured", sa.Float(), nullable=True),
        sa.Column("minority_recall_estimated", sa.Float(), nullable=True),
        sa.Column("report_path", sa.String(length=1024), nullable=True),
        sa.ForeignKeyConstraint(
            ["model_version"],
            ["model_versions.version"],
            name=op.f("fk_monitoring_snapshots_model_version_model_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_monitoring_snapshots")),
    )
    with op.batch_alter_table("monitoring_snapshots", schema=None) as batch_op:
        batch_op.create_index(
            "ix_monitoring_snapshots_model_version_created_at", ["model_version", "created_at"], unique=False
        )

    op.create_table(
        "predictions",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column(
            "request_kind",
            sa.Enum("utterance", "dialogue", "batch", name="requestkind", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column(
            "context_mode",
            sa.Enum("causal", "bidirectional", name="contextmode", native_enum=False, length=16),
            nullable=True,
        ),
        sa.Column("conversation_id", sa.String(length=256), nullable=True),
        sa.Column("turn_index", sa.Integer(), nullable=True),
        sa.Column("speaker", sa.String(length=256), nullable=True),
        sa.Column("text", sa.Text(), nullable=True),
        sa.Column("text_redacted", sa.Boolean(), nullable=False),
        sa.Column("text_sha256", sa.String(length=64), nullable=True),
        sa.Column("has_text", sa.Boolean(), nullable=False),
        sa.Column("has_audio", sa.Boolean(), nullable=False),
        sa.Column("audio_path", sa.String(length=1024), nullable=True),
        sa.Column("audio_seconds", sa.Float(), nullable=True),
        sa.Column("label", sa.String(length=32), nullable=False),
        sa.Column("label_index", sa.Integer(), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("probabilities", sa.JSON(), nullable=False),
        sa.Column("sentiment", sa.String(length=32), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("embedding", sa.LargeBinary(), nullable=True),
        sa.ForeignKeyConstraint(
            ["model_version"],
            ["model_versions.version"],
            name=op.f("fk_predictions_model_version_model_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_predictions")),
    )
    with op.batch_alter_table("predictions", schema=None) as batch_op:
        batch_op.create_index(
            "ix_predictions_conversation_id_turn_index", ["conversation_id", "turn_index"], unique=False
        )
        batch_op.create_index("ix_predictions_created_at", ["created_at"], unique=False)
        batch_op.create_index("ix_predictions_model_version_created_at", ["model_version", "created_at"], unique=False)
        batch_op.create_index("ix_predictions_text_sha256", ["text_sha256"], unique=False)

    op.create_table(
        "retraining_jobs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "queued",
                "running",
                "succeeded",
                "failed",
                "cancelled",
                name="jobstatus",
                native_enum=False,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column(
            "trigger",
            sa.Enum("collapse", "admin", "schedule", name="jobtrigger", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column("tier", sa.Integer(), nullable=True),
        sa.Column("engine", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("base_version", sa.String(length=64), nullable=True),
        sa.Column("candidate_version", sa.String(length=64), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_owner", sa.String(length=128), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("log", sa.Text(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["base_version"],
            ["model_versions.version"],
            name=op.f("fk_retraining_jobs_base_version_model_versions"),
        ),
        sa.ForeignKeyConstraint(
            ["candidate_version"],
            ["model_versions.version"],
            name=op.f("fk_retraining_jobs_candidate_version_model_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_retraining_jobs")),
    )
    with op.batch_alter_table("retraining_jobs", schema=None) as batch_op:
        batch_op.create_index("ix_retraining_jobs_lease_expires_at", ["lease_expires_at"], unique=False)
        batch_op.create_index("ix_retraining_jobs_status_not_before", ["status", "not_before"], unique=False)

    op.create_table(
        "collapse_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("snapshot_id", sa.Integer(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("evidence", sa.JSON(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["retraining_jobs.id"], name=op.f("fk_collapse_events_job_id_retraining_jobs")
        ),
        sa.ForeignKeyConstraint(
            ["model_version"],
            ["model_versions.version"],
            name=op.f("fk_collapse_events_model_version_model_versions"),
        ),
        sa.ForeignKeyConstraint(
            ["snapshot_id"],
            ["monitoring_snapshots.id"],
            name=op.f("fk_collapse_events_snapshot_id_monitoring_snapshots"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_collapse_events")),
    )
    with op.batch_alter_table("collapse_events", schema=None) as batch_op:
        batch_op.create_index("ix_collapse_events_created_at", ["created_at"], unique=False)

    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("prediction_id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("label", sa.String(length=32), nullable=False),
        sa.Column("sentiment", sa.String(length=32), nullable=True),
        sa.Column("source", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(
            ["prediction_id"],
            ["predictions.id"],
            name=op.f("fk_feedback_prediction_id_predictions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_feedback")),
    )
    with op.batch_alter_table("feedback", schema=None) as batch_op:
        batch_op.create_index("ix_feedback_created_at", ["created_at"], unique=False)
        batch_op.create_index("ix_feedback_prediction_id", ["prediction_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("feedback", schema=None) as batch_op:
        batch_op.drop_index("ix_feedback_prediction_id")
        batch_op.drop_index("ix_feedback_created_at")

    op.drop_table("feedback")
    with op.batch_alter_table("collapse_events", schema=None) as batch_op:
        batch_op.drop_index("ix_collapse_events_created_at")

    op.drop_table("collapse_events")
    with op.batch_alter_table("retraining_jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_retraining_jobs_status_not_before")
        batch_op.drop_index("ix_retraining_jobs_lease_expires_at")

    op.drop_table("retraining_jobs")
    with op.batch_alter_table("predictions", schema=None) as batch_op:
        batch_op.drop_index("ix_predictions_text_sha256")
        batch_op.drop_index("ix_predictions_model_version_created_at")
        batch_op.drop_index("ix_predictions_created_at")
        batch_op.drop_index("ix_predictions_conversation_id_turn_index")

    op.drop_table("predictions")
    with op.batch_alter_table("monitoring_snapshots", schema=None) as batch_op:
        batch_op.drop_index("ix_monitoring_snapshots_model_version_created_at")

    op.drop_table("monitoring_snapshots")
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_model_versions_one_champion",
            sqlite_where=sa.text("status = 'champion'"),
            postgresql_where=sa.text("status = 'champion'"),
        )

    op.drop_table("model_versions")
    op.drop_table("api_keys")
