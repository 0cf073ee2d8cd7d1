from fastapi import APIRouter
from sqlalchemy.exc import SQLAlchemyError

from backend import queries
from backend.api.deps import APIError, DbDep
from backend.api.schemas import Health
from backend.api.views import errors

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, responses=errors(503))
def healthz(db: DbDep):
    try:
        with db() as session:
            queries.ping(session)
    except SQLAlchemyError:
        raise APIError(503, "unavailable", "the database does not answer") from None
    return {"status": "ok", "database": "ok"}
