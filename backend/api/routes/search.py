from typing import Annotated

from fastapi import APIRouter, Query, Request
from sqlalchemy import Row
from sqlalchemy.orm import Session

from backend import queries
from backend.api import views
from backend.api.cache import run_answer
from backend.api.deps import DbDep, PagingDep, RunName, find_run
from backend.api.schemas import LEVEL_BOUNDS, MAX_QUERY_CHARS, SearchPage, Text

router = APIRouter(tags=["search"])

Term = Annotated[
    Text, Query(min_length=1, max_length=MAX_QUERY_CHARS, description="text to find, taken literally")
]


@router.get("/runs/{run}/search", response_model=SearchPage, responses=views.ERRORS)
def search(
    request: Request,
    db: DbDep,
    run_name: RunName,
    page: PagingDep,
    q: Term,
    level: Annotated[int | None, Query(**LEVEL_BOUNDS, description="only this level")] = None,
):
    """Features whose label, note or top output tokens contain q (case-insensitive)."""
    with db() as session:
        run = find_run(session, run_name)
        return run_answer(request, run, SearchPage, lambda: _search(session, run, q, level, page))


def _search(session: Session, run: Row, q: str, level: int | None, page):
    total, rows = queries.search(session, run.id, q, level, page.offset, page.limit)
    items = []
    for row in rows:
        hits = (("label", row.in_label), ("note", row.in_note), ("top_tokens", row.in_tokens))
        items.append({**views.feature_summary(row), "matched": [name for name, hit in hits if hit]})
    return {
        "run": run.name,
        "q": q,
        "level": level,
        "total": total,
        "offset": page.offset,
        "limit": page.limit,
        "items": items,
    }
