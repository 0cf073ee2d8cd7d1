from fastapi import APIRouter, Request

from backend import queries
from backend.api import views
from backend.api.cache import run_answer
from backend.api.deps import DbDep, PagingDep, RunName, find_run, not_found
from backend.api.schemas import RunDetail, RunsPage

router = APIRouter(tags=["runs"])


@router.get("/runs", response_model=RunsPage, responses=views.ERRORS)
def list_runs(db: DbDep, page: PagingDep):
    """Indexed runs, by name."""
    with db() as session:
        total, runs = queries.list_runs(session, page.offset, page.limit)
    items = [views.run_summary(run) for run in runs]
    return {"total": total, "offset": page.offset, "limit": page.limit, "items": items}


@router.get("/runs/{run}", response_model=RunDetail, responses=views.ERRORS)
def get_run(request: Request, db: DbDep, run_name: RunName):
    """A run with its checkpoint config, metrics, corpus and index settings."""
    with db() as session:
        run = find_run(session, run_name)

        def build():
            detail = queries.get_run_detail(session, run.id)
            if detail is None:  # replaced since its name was looked up
                raise not_found(f"no run named {run_name!r}")
            return views.run_detail(detail)

        return run_answer(request, run, RunDetail, build)
