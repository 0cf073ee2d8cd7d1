"""feature list and search indexes: sort indexes end in idx (pages read from the index alone, at any offset);
PostgreSQL gets a pg_trgm GIN index for label / note / top-token search

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SORT_COLUMNS = {
    "ix_features_density": "density",
    "ix_features_max_act": "max_act",
    "ix_features_label": "label",
}


def upgrade() -> None:
    for name, column in SORT_COLUMNS.items():
        op.drop_index(name, "features")
        op.create_index(name, "features", ["run_id", "level", column, "idx"])
    if op.get_context().dialect.name == "postgresql":
        # pg_trgm is a trusted extension (PostgreSQL 13+): the database's owner may create it.
        op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        op.execute(
            "CREATE INDEX ix_features_search ON features USING gin "
            "(lower(label) gin_trgm_ops, lower(note) gin_trgm_ops, lower(top_tokens_text) gin_trgm_ops)"
        )


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute("DROP INDEX ix_features_search")
    for name, column in SORT_COLUMNS.items():
        op.drop_index(name, "features")
        op.create_index(name, "features", ["run_id", "level", column])
