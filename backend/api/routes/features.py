from typing import Annotated

from fastapi import APIRouter, Query, Request
from sqlalchemy import Row
from sqlalchemy.orm import Session

from backend import queries
from backend.api import views
from backend.api.cache import run_answer
from backend.api.deps import DbDep, IndexPath, LevelPath, PagingDep, RunName, find_run, not_found
from backend.api.schemas import (
    LEVEL_BOUNDS,
    MAX_QUERY_CHARS,
    ChildrenPage,
    ExampleKind,
    ExamplesPage,
    FeatureDetail,
    FeaturePosition,
    ForestPage,
    SortKey,
    Text,
)

router = APIRouter(tags=["features"])

FEATURE = "/runs/{run}/features/{level}/{index}"
Sort = Annotated[SortKey, Query(description=SortKey.__doc__)]
Filter = Annotated[
    Text | None, Query(max_length=MAX_QUERY_CHARS, description="filter by label, note or top token")
]


def missing_feature(run: Row, level: int, index: int):
    return not_found(f"run {run.name!r} has no feature {level}/{index}")


@router.get("/runs/{run}/forest", response_model=ForestPage, responses=views.ERRORS)
def forest(
    request: Request,
    db: DbDep,
    run_name: RunName,
    page: PagingDep,
    level: Annotated[int, Query(**LEVEL_BOUNDS, description="0: the roots")] = 0,
    sort: Sort = SortKey.index,
    q: Filter = None,
):
    """The features of one level (the roots by default) with their child counts."""
    q = q or None
    with db() as session:
        run = find_run(session, run_name)
        return run_answer(request, run, ForestPage, lambda: _forest(session, run, page, level, sort, q))


def _forest(session: Session, run: Row, page, level: int, sort: SortKey, q: str | None):
    if level >= len(run.level_widths):
        raise not_found(f"run {run.name!r} has levels 0..{len(run.level_widths) - 1}, not {level}")
    total = queries.count_level(session, run.id, level, q) if q else run.level_widths[level]
    rows = queries.list_level(session, run.id, level, sort.value, page.offset, page.limit, q)
    return {
        "run": run.name,
        "level": level,
        "sort": sort,
        "q": q,
        "total": total,
        "offset": page.offset,
        "limit": page.limit,
        "items": [views.feature_summary(row) for row in rows],
    }


@router.get(FEATURE, response_model=FeatureDetail, responses=views.ERRORS)
def feature(request: Request, db: DbDep, run_name: RunName, level: LevelPath, index: IndexPath):
    """Stats, parent, first children, top output tokens, activation histogram and cross-width relatives of
    one feature."""
    with db() as session:
        run = find_run(session, run_name)
        return run_answer(request, run, FeatureDetail, lambda: _feature(session, run, level, index))


def _feature(session: Session, run: Row, level: int, index: int):
    found = queries.get_feature_page(session, run.id, level, index)
    if found is None:
        raise missing_feature(run, level, index)
    row = found.feature
    return {
        "run": run.name,
        "level": row.level,
        "index": row.idx,
        "label": row.label,
        "auto_label": row.auto_label,
        "note": row.note,
        "tags": row.tags or [],
        "annotated_at": row.annotated_at,
        "stats": {
            "fire_count": row.fire_count,
            "density": row.density,
            "max_act": row.max_act,
            "mean_act": row.mean_act,
        },
        "parent": views.parent_ref(row),
        "parent_edge": views.edge_stats(found.parent_edge),
        "child_count": row.child_count,
        "children": [views.child_summary(child) for child in found.children],
        "top_positive": views.top_tokens(row.top_positive),
        "top_negative": views.top_tokens(row.top_negative),
        "histogram": row.histogram,
        "relatives": [views.relative(r) for r in found.relatives],
    }


@router.get(FEATURE + "/children", response_model=ChildrenPage, responses=views.ERRORS)
def children(
    request: Request,
    db: DbDep,
    run_name: RunName,
    level: LevelPath,
    index: IndexPath,
    page: PagingDep,
    sort: Sort = SortKey.index,
):
    """The feature's children, with how each co-fires with it."""
    with db() as session:
        run = find_run(session, run_name)
        return run_answer(
            request, run, ChildrenPage, lambda: _children(session, run, level, index, page, sort)
        )


def _children(session: Session, run: Row, level: int, index: int, page, sort: SortKey):
    parent = queries.get_feature_ref(session, run.id, level, index)
    if parent is None:
        raise missing_feature(run, level, index)
    rows = queries.list_children(session, run.id, level, index, sort.value, page.offset, page.limit)
    return {
        "parent": views.feature_ref(level, index, parent.label),
        "sort": sort,
        "total": parent.child_count,
        "offset": page.offset,
        "limit": page.limit,
        "items": [views.child_summary(row) for row in rows],
    }


@router.get(FEATURE + "/position", response_model=FeaturePosition, responses=views.ERRORS)
def position(
    request: Request,
    db: DbDep,
    run_name: RunName,
    level: LevelPath,
    index: IndexPath,
    sort: Sort = SortKey.index,
):
    """Where the feature is listed, in the forest of its level and among its parent's children, for `sort`
    (ties broken by index in the key's direction, as the listings do)."""
    with db() as session:
        run = find_run(session, run_name)
        return run_answer(request, run, FeaturePosition, lambda: _position(session, run, level, index, sort))


def _position(session: Session, run: Row, level: int, index: int, sort: SortKey):
    found = queries.feature_position(session, run.id, level, index, sort.value)
    if found is None:
        raise missing_feature(run, level, index)
    return {
        "feature": views.feature_ref(level, index, found.label),
        "sort": sort,
        "forest_offset": found.in_level,
        "children_offset": found.in_parent if found.parent_level is not None else None,
    }


@router.get(FEATURE + "/examples", response_model=ExamplesPage, responses=views.ERRORS)
def examples(
    request: Request,
    db: DbDep,
    run_name: RunName,
    level: LevelPath,
    index: IndexPath,
    page: PagingDep,
    kind: Annotated[ExampleKind | None, Query(description="only top or only quantile examples")] = None,
):
    """Top-activating contexts (then lower-quantile ones) with the feature's value on every token."""
    with db() as session:
        run = find_run(session, run_name)
        return run_answer(
            request, run, ExamplesPage, lambda: _examples(session, run, level, index, page, kind)
        )


def _examples(session: Session, run: Row, level: int, index: int, page, kind: ExampleKind | None):
    found = queries.get_feature_ref(session, run.id, level, index)
    if found is None:
        raise missing_feature(run, level, index)
    total, rows = queries.list_examples(
        session, run.id, level, index, kind.value if kind else None, page.offset, page.limit
    )
    return {
        "feature": views.feature_ref(level, index, found.label),
        "kind": kind,
        "total": total,
        "offset": page.offset,
        "limit": page.limit,
        "items": [views.example(row) for row in rows],
    }
