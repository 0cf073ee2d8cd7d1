"""initial schema: runs, features, feature_edges, contexts, examples, annotation_events

Revision ID: 0001
Revises:
Create Date: 2026-11-21
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
        "runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("model_name", sa.String(length=300), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("hook", sa.String(length=200), nullable=False),
        sa.Column("arch", sa.String(length=50), nullable=False),
        sa.Column("checkpoint_digest", sa.String(length=64), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("corpus", sa.JSON(), nullable=False),
        sa.Column("index_settings", sa.JSON(), nullable=False),
        sa.Column("level_widths", sa.JSON(), nullable=False),
        sa.Column("n_tokens", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("complete", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runs")),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_runs_name", "runs", ["name"])
    op.create_index(
        "uq_runs_name_complete",
        "runs",
        ["name"],
        unique=True,
        sqlite_where=sa.text("complete"),
        postgresql_where=sa.text("complete"),
    )

    op.create_table(
        "features",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("level", sa.Integer(), nullable=False),
        sa.Column("idx", sa.Integer(), nullable=False),
        sa.Column("parent_level", sa.Integer(), nullable=True),
        sa.Column("parent_idx", sa.Integer(), nullable=True),
        sa.Column("child_count", sa.Integer(), nullable=False),
        sa.Column("fire_count", sa.BigInteger(), nullable=False),
        sa.Column("density", sa.Float(), nullable=False),
        sa.Column("max_act", sa.Float(), nullable=False),
        sa.Column("mean_act", sa.Float(), nullable=False),
        sa.Column("top_positive", sa.JSON(), nullable=False),
        sa.Column("top_negative", sa.JSON(), nullable=False),
        sa.Column("top_tokens_text", sa.Text(), nullable=False),
        sa.Column("histogram", sa.JSON(), nullable=False),
        sa.Column("label", sa.String(length=500), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("annotated_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_features_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", "level", "idx", name=op.f("pk_features")),
    )
    op.create_index("ix_features_children", "features", ["run_id", "parent_level", "parent_idx"])
    op.create_index("ix_features_density", "features", ["run_id", "level", "density"])
    op.create_index("ix_features_label", "features", ["run_id", "level", "label"])
    op.create_index("ix_features_max_act", "features", ["run_id", "level", "max_act"])

    op.create_table(
        "feature_edges",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("child_level", sa.Integer(), nullable=False),
        sa.Column("child_idx", sa.Integer(), nullable=False),
        sa.Column("parent_level", sa.Integer(), nullable=False),
        sa.Column("parent_idx", sa.Integer(), nullable=False),
        sa.Column("coactive_count", sa.BigInteger(), nullable=False),
        sa.Column("p_parent_given_child", sa.Float(), nullable=True),
        sa.Column("p_child_given_parent", sa.Float(), nullable=True),
        sa.Column("decoder_cosine", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_feature_edges_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint(
            "run_id", "child_level", "child_idx", "parent_level", "parent_idx", name=op.f("pk_feature_edges")
        ),
    )
    op.create_index("ix_feature_edges_parent", "feature_edges", ["run_id", "parent_level", "parent_idx"])

    op.create_table(
        "contexts",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("context_id", sa.BigInteger(), nullable=False),
        sa.Column("tokens", sa.JSON(), nullable=False),
        sa.Column("doc_id", sa.String(length=500), nullable=False),
        sa.Column("start", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_contexts_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", "context_id", name=op.f("pk_contexts")),
    )

    op.create_table(
        "examples",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("level", sa.Integer(), nullable=False),
        sa.Column("idx", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("bucket", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("context_id", sa.BigInteger(), nullable=False),
        sa.Column("token_values", sa.JSON(), nullable=False),
        sa.Column("max_value", sa.Float(), nullable=False),
        sa.Column("max_position", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_examples_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", "level", "idx", "kind", "bucket", "rank", name=op.f("pk_examples")),
    )

    op.create_table(
        "annotation_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_name", sa.String(length=200), nullable=False),
        sa.Column("checkpoint_digest", sa.String(length=64), nullable=False),
        sa.Column("level", sa.Integer(), nullable=False),
        sa.Column("idx", sa.Integer(), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("author", sa.String(length=200), nullable=False),
        sa.Column("old_label", sa.String(length=500), nullable=True),
        sa.Column("new_label", sa.String(length=500), nullable=True),
        sa.Column("old_note", sa.Text(), nullable=True),
        sa.Column("new_note", sa.Text(), nullable=True),
        sa.Column("old_tags", sa.JSON(), nullable=False),
        sa.Column("new_tags", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_annotation_events")),
    )
    op.create_index(
        "ix_annotation_events_feature", "annotation_events", ["run_name", "level", "idx", "changed_at"]
    )


def downgrade() -> None:
    # Children before parents; dropping a table drops its indexes.
    for table in ("annotation_events", "examples", "contexts", "feature_edges", "features", "runs"):
        op.drop_table(table)
