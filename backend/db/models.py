"""The schema, as SQLAlchemy typed models. Alembic migrations (alembic/versions) create and change it; a test
checks that the migrations at head and these models agree.

A feature is addressed by (run_id, level, idx), level 0 being the top; the tables hanging off a feature use
that natural key, so the API can read a feature page without first looking up a surrogate id. Every table's
primary key starts with run_id, and its only foreign key is run_id → runs (ON DELETE CASCADE): the links
between features, edges, examples and contexts are written once by the indexer, which keeps them consistent;
per-row foreign-key checks against features made PostgreSQL bulk inserts about ten times slower.

Rules every reader and writer relies on:
- A run is visible only when `complete` is true (`visible_runs()`). The indexer writes a run with
  complete=False in many transactions and flips it in one final one; a crash leaves an invisible orphan
  that the next index of the same name deletes. At most one *complete* run holds a name.
- Annotation changes append an AnnotationEvent (old and new values) in the same transaction that updates
  Feature.label/note/tags, sets Feature.annotated_at and bumps Run.annotation_version. Everything else of a
  complete run is never written again: the API caches a run's answers keyed by (id, digest, that version).
  Events are keyed by run *name*, not run id, so the history outlives a re-index of the run.
- Text search: `lower(column) LIKE lower(p)` on label, note and top_tokens_text, p = "%term%" (escape %
  and _), on both backends (what `ilike` renders on SQLite). Written so, PostgreSQL answers it from the
  trigram index ix_features_search (pg_trgm, PostgreSQL only) instead of scanning the run.
- Sorted feature lists: the sort indexes end in idx, the tie-breaker, so a page at any offset is read from
  the index alone (see backend/queries.py).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Select,
    String,
    Text,
    func,
    select,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Deterministic constraint names, so migrations (batch mode on SQLite recreates tables) can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

EXAMPLE_KINDS = ("top", "quantile")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        datetime: DateTime(timezone=True),
        dict[str, Any]: JSON,
        list[Any]: JSON,
    }


class Run(Base):
    """One indexed checkpoint: what it was trained on, how it was indexed, and whether it is visible yet."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    model_name: Mapped[str] = mapped_column(String(300))
    layer: Mapped[int]
    hook: Mapped[str] = mapped_column(String(200))
    arch: Mapped[str] = mapped_column(String(50))
    checkpoint_digest: Mapped[str] = mapped_column(String(64), doc="sha256 hex digest of weights.safetensors")
    checkpoint_path: Mapped[str | None] = mapped_column(
        Text, doc="absolute path of the checkpoint directory, for live prompt activations; None if not known"
    )
    config: Mapped[dict[str, Any]] = mapped_column(doc="the checkpoint's cfg.json")
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), doc="metrics.json")
    corpus: Mapped[dict[str, Any]] = mapped_column(doc="what was indexed: corpus spec, context length, ...")
    index_settings: Mapped[dict[str, Any]] = mapped_column(doc="the IndexConfig used: top_k, histogram, ...")
    level_widths: Mapped[list[Any]]
    n_tokens: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    complete: Mapped[bool] = mapped_column(Boolean, default=False)
    annotation_version: Mapped[int] = mapped_column(
        BigInteger, default=0, server_default="0",
        doc="bumped by every annotation change of the run (same transaction); the API's ETags key on it",
    )

    __table_args__ = (
        Index("ix_runs_name", "name"),
        # Partial unique index: a replacement is written under the same name while the old run stays visible.
        Index(
            "uq_runs_name_complete",
            "name",
            unique=True,
            sqlite_where=text("complete"),
            postgresql_where=text("complete"),
        ),
        # Never reuse a deleted run's id: a reader holding a stale id must not find another run under it.
        {"sqlite_autoincrement": True},
    )


class Feature(Base):
    """A latent of one level, with its activation statistics, place in the forest, and annotations."""

    __tablename__ = "features"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    level: Mapped[int] = mapped_column(Integer, primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    parent_level: Mapped[int | None]
    parent_idx: Mapped[int | None]
    child_count: Mapped[int] = mapped_column(Integer, default=0)
    fire_count: Mapped[int] = mapped_column(BigInteger, doc="tokens on which the feature is active")
    density: Mapped[float] = mapped_column(Float, doc="fire_count / tokens indexed")
    max_act: Mapped[float] = mapped_column(Float, doc="0 when the feature never fired")
    mean_act: Mapped[float] = mapped_column(Float, doc="mean over active tokens; 0 when it never fired")
    top_positive: Mapped[list[Any]] = mapped_column(doc="[[token string, logit], ...] strongest first")
    top_negative: Mapped[list[Any]] = mapped_column(doc="[[token string, logit], ...] most negative first")
    top_tokens_text: Mapped[str] = mapped_column(Text, default="", doc="top positive tokens, one a line")
    histogram: Mapped[dict[str, Any]] = mapped_column(
        deferred=True, doc='{"edges": [b0, ..., bn], "counts": [c0, ..., c(n-1)]} of non-zero activations'
    )
    auto_label: Mapped[str | None] = mapped_column(
        String(200), doc="the tokens it fires on most (backend/index/labels.py); shown until labelled"
    )
    label: Mapped[str | None] = mapped_column(String(500))
    note: Mapped[str | None] = mapped_column(Text)
    tags: Mapped[list[Any]] = mapped_column(default=list)
    annotated_at: Mapped[datetime | None] = mapped_column(doc="last annotation change; None: never annotated")

    __table_args__ = (
        Index("ix_features_children", "run_id", "parent_level", "parent_idx"),
        Index("ix_features_density", "run_id", "level", "density", "idx"),
        Index("ix_features_max_act", "run_id", "level", "max_act", "idx"),
        Index("ix_features_label", "run_id", "level", "label", "idx"),
        # PostgreSQL only (migration 0003); on SQLite, Alembic's comparison skips expression indexes.
        Index(
            "ix_features_search",
            func.lower(label).label("label"),
            func.lower(note).label("note"),
            func.lower(top_tokens_text).label("top_tokens_text"),
            postgresql_using="gin",
            postgresql_ops={name: "gin_trgm_ops" for name in ("label", "note", "top_tokens_text")},
        ),
    )


class FeatureEdge(Base):
    """A parent → child link with how the two co-fire and how aligned their decoder directions are."""

    __tablename__ = "feature_edges"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    child_level: Mapped[int] = mapped_column(Integer, primary_key=True)
    child_idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    parent_level: Mapped[int] = mapped_column(Integer, primary_key=True)
    parent_idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    coactive_count: Mapped[int] = mapped_column(BigInteger, doc="tokens where parent and child both fire")
    p_parent_given_child: Mapped[float | None] = mapped_column(Float, doc="None when the child never fired")
    p_child_given_parent: Mapped[float | None] = mapped_column(Float, doc="None when the parent never fired")
    decoder_cosine: Mapped[float | None] = mapped_column(Float)

    __table_args__ = (Index("ix_feature_edges_parent", "run_id", "parent_level", "parent_idx"),)


class FeatureRelative(Base):
    """A feature of another level that a feature co-fires with among the most (its cross-width relative):
    rank 0.. within (feature, rel_level) by co-firing tokens, ties to the lowest index."""

    __tablename__ = "feature_relatives"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    level: Mapped[int] = mapped_column(Integer, primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    rel_level: Mapped[int] = mapped_column(Integer, primary_key=True)
    rel_idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    rank: Mapped[int] = mapped_column(Integer)
    coactive_count: Mapped[int] = mapped_column(BigInteger, doc="tokens where both fire")
    p_relative_given_feature: Mapped[float] = mapped_column(Float)
    p_feature_given_relative: Mapped[float] = mapped_column(Float)
    decoder_cosine: Mapped[float | None] = mapped_column(Float)


class Context(Base):
    """A fixed-length token window of the corpus that some example shows; stored once, shared by examples."""

    __tablename__ = "contexts"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    context_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    tokens: Mapped[list[Any]] = mapped_column(doc="token strings")
    doc_id: Mapped[str] = mapped_column(String(500), doc="source document")
    start: Mapped[int] = mapped_column(BigInteger, doc="position of the first token in the source document")


class Example(Base):
    """A context shown on a feature page with the feature's value on each of its tokens.

    kind 'top': bucket 0, rank 0.. by max value (descending). kind 'quantile': bucket b of n covers max values
    in [b/n, (b+1)/n) × the feature's max_act; ranks within a bucket by max value (descending).
    """

    __tablename__ = "examples"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    level: Mapped[int] = mapped_column(Integer, primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    bucket: Mapped[int] = mapped_column(Integer, primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    context_id: Mapped[int] = mapped_column(BigInteger)
    token_values: Mapped[list[Any]] = mapped_column(doc="the feature's value on each token of the context")
    max_value: Mapped[float] = mapped_column(Float)
    max_position: Mapped[int] = mapped_column(Integer, doc="first token position holding max_value")


class AnnotationEvent(Base):
    """One change of a feature's label, note or tags: nothing a person writes is ever lost."""

    __tablename__ = "annotation_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_name: Mapped[str] = mapped_column(String(200))
    checkpoint_digest: Mapped[str] = mapped_column(String(64), doc="tells apart runs that reused a name")
    level: Mapped[int]
    idx: Mapped[int]
    changed_at: Mapped[datetime] = mapped_column(default=utcnow)
    author: Mapped[str] = mapped_column(String(200))
    old_label: Mapped[str | None] = mapped_column(String(500))
    new_label: Mapped[str | None] = mapped_column(String(500))
    old_note: Mapped[str | None] = mapped_column(Text)
    new_note: Mapped[str | None] = mapped_column(Text)
    old_tags: Mapped[list[Any]]
    new_tags: Mapped[list[Any]]

    __table_args__ = (Index("ix_annotation_events_feature", "run_name", "level", "idx", "changed_at"),)


def visible_runs(*columns: Any) -> Select[Any]:
    """The runs readers may see: complete ones only. The one definition of visibility, used by the API's
    queries, the index writer and the demo; `columns`: what to select (default: the Run entity)."""
    return select(*(columns or (Run,))).where(Run.complete.is_(True))


def hidden_runs(*columns: Any) -> Select[Any]:
    """The runs readers never see: being written, replaced, or left behind by a writer that died."""
    return select(*(columns or (Run,))).where(Run.complete.is_(False))
