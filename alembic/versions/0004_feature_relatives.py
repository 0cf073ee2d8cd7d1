"""feature_relatives: each feature's most co-firing features of the other levels (cross-width relatives)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "feature_relatives",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("level", sa.Integer(), nullable=False),
        sa.Column("idx", sa.Integer(), nullable=False),
        sa.Column("rel_level", sa.Integer(), nullable=False),
        sa.Column("rel_idx", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("coactive_count", sa.BigInteger(), nullable=False),
        sa.Column("p_relative_given_feature", sa.Float(), nullable=False),
        sa.Column("p_feature_given_relative", sa.Float(), nullable=False),
        sa.Column("decoder_cosine", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_feature_relatives_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint(
            "run_id", "level", "idx", "rel_level", "rel_idx", name=op.f("pk_feature_relatives")
        ),
    )


def downgrade() -> None:
    op.drop_table("feature_relatives")
