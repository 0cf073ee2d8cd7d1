"""features.auto_label: a short automatic label from the tokens each feature fires on most, shown until a
person labels the feature; filled here for runs indexed before, from their stored top examples

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BATCH = 2000


def upgrade() -> None:
    with op.batch_alter_table("features") as batch:
        batch.add_column(sa.Column("auto_label", sa.String(200), nullable=True))
    _fill_from_examples(op.get_bind())


def _fill_from_examples(conn: sa.Connection) -> None:
    """For every run, each feature's top examples (strongest first) give the token at their strongest
    position; backend.index.labels.auto_label names the feature from them, as the index writer now does."""
    from backend.index.labels import auto_label

    meta = sa.MetaData()
    features = sa.Table("features", meta, autoload_with=conn)
    examples = sa.Table("examples", meta, autoload_with=conn)
    contexts = sa.Table("contexts", meta, autoload_with=conn)
    run_ids = conn.execute(sa.select(examples.c.run_id).distinct()).scalars().all()
    for run_id in run_ids:
        rows = conn.execute(
            sa.select(examples.c.level, examples.c.idx, examples.c.max_position, contexts.c.tokens)
            .join(
                contexts,
                (contexts.c.run_id == examples.c.run_id) & (contexts.c.context_id == examples.c.context_id),
            )
            .where(examples.c.run_id == run_id, examples.c.kind == "top")
            .order_by(examples.c.level, examples.c.idx, examples.c.bucket, examples.c.rank)
        )
        tokens: dict[tuple[int, int], list[str]] = {}
        for level, idx, position, context_tokens in rows:
            if 0 <= position < len(context_tokens):
                tokens.setdefault((level, idx), []).append(context_tokens[position])
        updates = [
            {"r": run_id, "l": level, "i": idx, "auto": auto_label(found)}
            for (level, idx), found in tokens.items()
        ]
        statement = (
            features.update()
            .where(
                features.c.run_id == sa.bindparam("r"),
                features.c.level == sa.bindparam("l"),
                features.c.idx == sa.bindparam("i"),
            )
            .values(auto_label=sa.bindparam("auto"))
        )
        for start in range(0, len(updates), _BATCH):
            conn.execute(statement, updates[start : start + _BATCH])


def downgrade() -> None:
    with op.batch_alter_table("features") as batch:
        batch.drop_column("auto_label")
