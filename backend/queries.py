"""Every database query of the API, the export and the import: the one module that holds SQL.

Functions take a Session and return plain rows or dataclasses; the routes turn them into wire models. All
values reach the database as bound parameters. Lists that can grow are ordered by a key that ends in a
unique column, so offset/limit pages never skip or repeat a row.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Row, and_, case, func, literal, or_, select, tuple_
from sqlalchemy.orm import Session, aliased

from backend.db.models import (
    AnnotationEvent,
    Context,
    Example,
    Feature,
    FeatureEdge,
    FeatureRelative,
    Run,
    utcnow,
    visible_runs,
)

TOP_TOKENS_SHOWN = 5
CHILDREN_PREVIEW = 100
_IN_CHUNK = 500  # keys per IN (...) list: far below every backend's bound-parameter limit


# ---- runs ------------------------------------------------------------------------------------------------
RUN_COLUMNS = (
    Run.id,
    Run.name,
    Run.model_name,
    Run.layer,
    Run.hook,
    Run.arch,
    Run.checkpoint_digest,
    Run.checkpoint_path,
    Run.level_widths,
    Run.n_tokens,
    Run.created_at,
    Run.annotation_version,
)
"""What every request needs of its run; the large JSON columns (config, corpus, ...) stay in the database."""


def _visible_runs():
    return visible_runs(*RUN_COLUMNS)


def list_runs(session: Session, offset: int, limit: int) -> tuple[int, Sequence[Row]]:
    total = session.scalar(select(func.count()).select_from(visible_runs(Run.id).subquery())) or 0
    rows = session.execute(_visible_runs().order_by(Run.name, Run.id).offset(offset).limit(limit)).all()
    return total, rows


def get_run(session: Session, name: str) -> Row | None:
    """The visible run of that name, as RUN_COLUMNS."""
    return session.execute(_visible_runs().where(Run.name == name)).first()


def get_run_detail(session: Session, run_id: int) -> Run | None:
    return session.get(Run, run_id)


def newest_live_runs(session: Session, limit: int) -> Sequence[Row]:
    """The newest visible runs that know their checkpoint (live prompts can load them)."""
    return session.execute(
        _visible_runs().where(Run.checkpoint_path.is_not(None)).order_by(Run.created_at.desc()).limit(limit)
    ).all()


def find_runs_by_identity(session: Session, model: str, layer: int, arch: str, digest: str) -> Sequence[Row]:
    """Visible runs of the same checkpoint (an export from one can be imported into another)."""
    return session.execute(
        _visible_runs()
        .where(Run.model_name == model, Run.layer == layer, Run.arch == arch, Run.checkpoint_digest == digest)
        .order_by(Run.name, Run.id)
    ).all()


# ---- feature lists ---------------------------------------------------------------------------------------
_Parent = aliased(Feature, name="parent")

_SUMMARY_COLUMNS = (
    Feature.level,
    Feature.idx,
    Feature.label,
    Feature.auto_label,
    Feature.tags,
    Feature.density,
    Feature.max_act,
    Feature.fire_count,
    Feature.child_count,
    Feature.parent_level,
    Feature.parent_idx,
    Feature.top_positive,
    _Parent.label.label("parent_label"),
)
_PARENT_JOIN = and_(
    _Parent.run_id == Feature.run_id, _Parent.level == Feature.parent_level, _Parent.idx == Feature.parent_idx
)
_EDGE_JOIN = and_(
    FeatureEdge.run_id == Feature.run_id,
    FeatureEdge.child_level == Feature.level,
    FeatureEdge.child_idx == Feature.idx,
    FeatureEdge.parent_level == Feature.parent_level,
    FeatureEdge.parent_idx == Feature.parent_idx,
)
_EDGE_COLUMNS = (
    FeatureEdge.coactive_count,
    FeatureEdge.p_parent_given_child,
    FeatureEdge.p_child_given_parent,
    FeatureEdge.decoder_cosine,
)


def _order(sort: str) -> list[Any]:
    """ORDER BY for a sort key (see SortKey). The index breaks ties in the direction of the key, so that the
    order is total and matches a sort index (run_id, level, key, idx) read forwards or backwards."""
    if sort == "index":
        return [Feature.idx]
    if sort == "label":
        return [Feature.label.asc().nulls_last(), Feature.idx]
    key = {"density": Feature.density, "max_act": Feature.max_act, "child_count": Feature.child_count}[sort]
    return [key.desc(), Feature.idx.desc()]


def escape_like(term: str) -> str:
    """`term` as a LIKE pattern matching it anywhere, its % and _ taken literally (escape character \\)."""
    return "%" + term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _text_matches(term: str) -> tuple[ColumnElement[bool], ColumnElement[bool], ColumnElement[bool]]:
    """Case-insensitive substring tests, written as lower(column) LIKE lower(pattern) on both backends so that
    PostgreSQL uses its trigram index (ix_features_search)."""
    pattern = func.lower(escape_like(term))
    return tuple(  # type: ignore[return-value]
        func.lower(column).like(pattern, escape="\\")
        for column in (Feature.label, Feature.note, Feature.top_tokens_text)
    )


def count_level(session: Session, run_id: int, level: int, q: str | None) -> int:
    """How many features `list_level` pages through (without q, the level's width says it: the indexer
    writes a row for every latent)."""
    where: list[ColumnElement[bool]] = [Feature.run_id == run_id, Feature.level == level]
    if q:
        where.append(or_(*_text_matches(q)))
    return session.scalar(select(func.count()).select_from(Feature).where(*where)) or 0


def list_level(
    session: Session, run_id: int, level: int, sort: str, offset: int, limit: int, q: str | None
) -> Sequence[Row]:
    """A page of one level's features (roots at level 0), optionally those whose label, note or top tokens
    hold q. The page's keys are found first, from the sort index alone; only its rows are then read."""
    where: list[ColumnElement[bool]] = [Feature.run_id == run_id, Feature.level == level]
    if q:
        where.append(or_(*_text_matches(q)))
    page = select(Feature.idx).where(*where).order_by(*_order(sort)).offset(offset).limit(limit).subquery()
    return session.execute(
        select(*_SUMMARY_COLUMNS)
        .join(page, and_(Feature.run_id == run_id, Feature.level == level, Feature.idx == page.c.idx))
        .outerjoin(_Parent, _PARENT_JOIN)
        .order_by(*_order(sort))
    ).all()


def list_children(
    session: Session, run_id: int, level: int, idx: int, sort: str, offset: int, limit: int
) -> Sequence[Row]:
    """A page of a feature's children (their number is the parent's child_count)."""
    return session.execute(
        select(*_SUMMARY_COLUMNS, *_EDGE_COLUMNS)
        .outerjoin(_Parent, _PARENT_JOIN)
        .outerjoin(FeatureEdge, _EDGE_JOIN)
        .where(Feature.run_id == run_id, Feature.parent_level == level, Feature.parent_idx == idx)
        .order_by(*_order(sort))
        .offset(offset)
        .limit(limit)
    ).all()


def feature_position(session: Session, run_id: int, level: int, idx: int, sort: str) -> Row | None:
    """Where a feature sits, 0-based, in `list_level` (unfiltered) and among its parent's children in
    `list_children`, both in the order of `sort`: one query, numbering rows by the listings' own ORDER BY (the
    children of one parent all sit on the level below it, so they are one partition of this level)."""
    order = _order(sort)
    siblings = [Feature.parent_level, Feature.parent_idx]
    ranked = (
        select(
            Feature.idx,
            Feature.label,
            Feature.parent_level,
            (func.row_number().over(order_by=order) - 1).label("in_level"),
            (func.row_number().over(partition_by=siblings, order_by=order) - 1).label("in_parent"),
        )
        .where(Feature.run_id == run_id, Feature.level == level)
        .subquery()
    )
    return session.execute(select(ranked).where(ranked.c.idx == idx)).one_or_none()


def search(
    session: Session, run_id: int, term: str, level: int | None, offset: int, limit: int
) -> tuple[int, Sequence[Row]]:
    """Features whose label, note or top tokens contain `term` (case-insensitive); label matches first."""
    label, note, tokens = _text_matches(term)
    where: list[ColumnElement[bool]] = [Feature.run_id == run_id, or_(label, note, tokens)]
    if level is not None:
        where.append(Feature.level == level)
    total = session.scalar(select(func.count()).select_from(Feature).where(*where)) or 0
    rank = case((label, 0), (note, 1), else_=2)
    rows = session.execute(
        select(
            *_SUMMARY_COLUMNS,
            label.label("in_label"),
            note.label("in_note"),
            tokens.label("in_tokens"),
        )
        .outerjoin(_Parent, _PARENT_JOIN)
        .where(*where)
        .order_by(rank, Feature.level, Feature.idx)
        .offset(offset)
        .limit(limit)
    ).all()
    return total, rows


# ---- one feature -----------------------------------------------------------------------------------------
@dataclass
class FeaturePage:
    feature: Row
    parent_edge: Row | None
    children: Sequence[Row]
    relatives: Sequence[Row] = ()


def get_feature_page(session: Session, run_id: int, level: int, idx: int) -> FeaturePage | None:
    feature = session.execute(
        select(
            Feature.level,
            Feature.idx,
            Feature.label,
            Feature.auto_label,
            Feature.note,
            Feature.tags,
            Feature.annotated_at,
            Feature.fire_count,
            Feature.density,
            Feature.max_act,
            Feature.mean_act,
            Feature.parent_level,
            Feature.parent_idx,
            Feature.child_count,
            Feature.top_positive,
            Feature.top_negative,
            Feature.histogram,
            _Parent.label.label("parent_label"),
            *_EDGE_COLUMNS,
        )
        .outerjoin(_Parent, _PARENT_JOIN)
        .outerjoin(FeatureEdge, _EDGE_JOIN)
        .where(Feature.run_id == run_id, Feature.level == level, Feature.idx == idx)
    ).first()
    if feature is None:
        return None
    children: Sequence[Row] = ()
    if feature.child_count:
        children = list_children(session, run_id, level, idx, "index", 0, CHILDREN_PREVIEW)
    edge = feature if feature.coactive_count is not None else None
    return FeaturePage(feature, edge, children, list_relatives(session, run_id, level, idx))


_Relative = aliased(Feature)


def list_relatives(session: Session, run_id: int, level: int, idx: int) -> Sequence[Row]:
    """The feature's cross-width relatives, by level then rank, with each relative's label."""
    return session.execute(
        select(
            FeatureRelative.rel_level,
            FeatureRelative.rel_idx,
            FeatureRelative.rank,
            FeatureRelative.coactive_count,
            FeatureRelative.p_relative_given_feature,
            FeatureRelative.p_feature_given_relative,
            FeatureRelative.decoder_cosine,
            _Relative.label,
        )
        .outerjoin(_Relative, (_Relative.run_id == FeatureRelative.run_id)
                   & (_Relative.level == FeatureRelative.rel_level)
                   & (_Relative.idx == FeatureRelative.rel_idx))
        .where(FeatureRelative.run_id == run_id, FeatureRelative.level == level, FeatureRelative.idx == idx)
        .order_by(FeatureRelative.rel_level, FeatureRelative.rank)
    ).all()


def get_feature_ref(session: Session, run_id: int, level: int, idx: int) -> Row | None:
    """A feature's label and child count; None if the run has no such feature."""
    return session.execute(
        select(Feature.level, Feature.idx, Feature.label, Feature.child_count).where(
            Feature.run_id == run_id, Feature.level == level, Feature.idx == idx
        )
    ).first()


def list_examples(
    session: Session, run_id: int, level: int, idx: int, kind: str | None, offset: int, limit: int
) -> tuple[int, Sequence[Row]]:
    """Top examples first (by rank), then quantile examples from the highest bucket down."""
    where = [Example.run_id == run_id, Example.level == level, Example.idx == idx]
    if kind is not None:
        where.append(Example.kind == kind)
    total = session.scalar(select(func.count()).select_from(Example).where(*where)) or 0
    rows = session.execute(
        _examples_select()
        .where(*where)
        .order_by(
            case((Example.kind == "top", 0), else_=1), Example.bucket.desc(), Example.rank, Example.kind
        )
        .offset(offset)
        .limit(limit)
    ).all()
    return total, rows


def _examples_select():
    return select(
        Example.level,
        Example.idx,
        Example.kind,
        Example.bucket,
        Example.rank,
        Example.context_id,
        Example.token_values,
        Example.max_value,
        Example.max_position,
        Context.tokens,
        Context.doc_id,
        Context.start,
    ).join(Context, and_(Context.run_id == Example.run_id, Context.context_id == Example.context_id))


# ---- subtrees (export) -----------------------------------------------------------------------------------
_SUBTREE_COLUMNS = (
    Feature.level,
    Feature.idx,
    Feature.parent_level,
    Feature.parent_idx,
    Feature.label,
    Feature.note,
    Feature.tags,
    Feature.fire_count,
    Feature.density,
    Feature.max_act,
    Feature.mean_act,
    Feature.child_count,
    Feature.top_positive,
    Feature.top_negative,
)


def get_subtree_root(session: Session, run_id: int, level: int, idx: int) -> Row | None:
    return session.execute(
        select(*_SUBTREE_COLUMNS).where(Feature.run_id == run_id, Feature.level == level, Feature.idx == idx)
    ).first()


def get_children_of(session: Session, run_id: int, level: int, parents: Sequence[int]) -> list[Row]:
    """The children of several features of one level, ordered by parent then index."""
    rows: list[Row] = []
    for chunk in _chunks(parents):
        rows += session.execute(
            select(*_SUBTREE_COLUMNS)
            .where(Feature.run_id == run_id, Feature.parent_level == level, Feature.parent_idx.in_(chunk))
            .order_by(Feature.parent_idx, Feature.idx)
        ).all()
    return rows


def get_examples_of(session: Session, run_id: int, level: int, indices: Sequence[int]) -> list[Row]:
    """Every example of several features of one level, in the order `list_examples` shows them."""
    rows: list[Row] = []
    for chunk in _chunks(indices):
        rows += session.execute(
            _examples_select()
            .where(Example.run_id == run_id, Example.level == level, Example.idx.in_(chunk))
            .order_by(
                Example.idx, case((Example.kind == "top", 0), else_=1), Example.bucket.desc(), Example.rank
            )
        ).all()
    return rows


def _chunks(values: Sequence[int]) -> Iterable[list[int]]:
    values = list(values)
    for start in range(0, len(values), _IN_CHUNK):
        yield values[start : start + _IN_CHUNK]


# ---- annotations -----------------------------------------------------------------------------------------
@dataclass
class AnnotationChange:
    label: str | None
    note: str | None
    tags: list[str]
    annotated_at: Any
    changed: bool


def lock_annotations(
    session: Session, run_id: int, keys: Sequence[tuple[int, int]]
) -> dict[tuple[int, int], Row]:
    """Current label, note and tags of features (level, index), locked for update where the database can."""
    found: dict[tuple[int, int], Row] = {}
    keys = list(keys)
    for start in range(0, len(keys), _IN_CHUNK):
        chunk = keys[start : start + _IN_CHUNK]
        rows = session.execute(
            select(
                Feature.level, Feature.idx, Feature.label, Feature.note, Feature.tags, Feature.annotated_at
            )
            .where(Feature.run_id == run_id, tuple_(Feature.level, Feature.idx).in_(chunk))
            .with_for_update()
        ).all()
        found.update({(row.level, row.idx): row for row in rows})
    return found


def write_annotation(
    session: Session,
    run: Row,
    current: Row,
    label: str | None,
    note: str | None,
    tags: list[str],
    author: str,
) -> AnnotationChange:
    """Set a feature's annotation and append its history event, in the caller's transaction; a request that
    repeats the stored annotation changes nothing and records nothing."""
    old_tags = list(current.tags or [])
    if (current.label, current.note, old_tags) == (label, note, tags):
        return AnnotationChange(label, note, tags, current.annotated_at, changed=False)
    now = utcnow()
    session.execute(
        Feature.__table__.update()
        .where(Feature.run_id == run.id, Feature.level == current.level, Feature.idx == current.idx)
        .values(label=label, note=note, tags=tags, annotated_at=now)
    )
    # Cached pages of the run (backend/api/cache.py) go stale with this commit, not before or after it.
    session.execute(
        Run.__table__.update()
        .where(Run.id == run.id)
        .values(annotation_version=Run.annotation_version + 1)
    )
    session.add(
        AnnotationEvent(
            run_name=run.name,
            checkpoint_digest=run.checkpoint_digest,
            level=current.level,
            idx=current.idx,
            changed_at=now,
            author=author,
            old_label=current.label,
            new_label=label,
            old_note=current.note,
            new_note=note,
            old_tags=old_tags,
            new_tags=tags,
        )
    )
    return AnnotationChange(label, note, tags, now, changed=True)


def annotation_history(
    session: Session, run: Row, level: int, idx: int, offset: int, limit: int
) -> tuple[int, Sequence[AnnotationEvent]]:
    where = (
        AnnotationEvent.run_name == run.name,
        AnnotationEvent.checkpoint_digest == run.checkpoint_digest,
        AnnotationEvent.level == level,
        AnnotationEvent.idx == idx,
    )
    total = session.scalar(select(func.count()).select_from(AnnotationEvent).where(*where)) or 0
    events = session.scalars(
        select(AnnotationEvent)
        .where(*where)
        .order_by(AnnotationEvent.changed_at.desc(), AnnotationEvent.id.desc())
        .offset(offset)
        .limit(limit)
    ).all()
    return total, events


def labels_of(session: Session, run_id: int, keys: Iterable[tuple[int, int]]) -> dict[tuple[int, int], str]:
    """Labels of the labelled features among (level, index) keys."""
    labels: dict[tuple[int, int], str] = {}
    keys = list(keys)
    for start in range(0, len(keys), _IN_CHUNK):
        chunk = keys[start : start + _IN_CHUNK]
        rows = session.execute(
            select(Feature.level, Feature.idx, Feature.label).where(
                Feature.run_id == run_id,
                Feature.label.is_not(None),
                tuple_(Feature.level, Feature.idx).in_(chunk),
            )
        ).all()
        labels.update({(row.level, row.idx): row.label for row in rows})
    return labels


def steering_features(
    session: Session, run_id: int, level: int, idx: int, with_children: bool
) -> tuple[Row | None, list[Row]]:
    """A feature's label and max activation (None if the run has no such feature) and, when asked, its
    children's indices and max activations, by index."""
    columns = (Feature.level, Feature.idx, Feature.label, Feature.max_act)
    feature = session.execute(
        select(*columns).where(Feature.run_id == run_id, Feature.level == level, Feature.idx == idx)
    ).first()
    if feature is None or not with_children:
        return feature, []
    children = session.execute(
        select(*columns)
        .where(Feature.run_id == run_id, Feature.parent_level == level, Feature.parent_idx == idx)
        .order_by(Feature.idx)
    ).all()
    return feature, list(children)


def ping(session: Session) -> None:
    session.execute(select(literal(1)))
