"""What routes depend on, as Annotated types: the database, path and paging parameters, the write
permission, and the API's error type. Dependencies that do no I/O are `async def`, so FastAPI runs them on
the event loop instead of sending each through the thread pool."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Row
from sqlalchemy.orm import Session, sessionmaker

from backend import queries
from backend.api.schemas import INDEX_BOUNDS, LEVEL_BOUNDS, MAX_LIMIT, MAX_OFFSET, Text
from backend.live import LiveService


class APIError(Exception):
    """An answer other than success: status, machine-readable kind, and a message for a person."""

    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers


def not_found(detail: str) -> APIError:
    return APIError(404, "not_found", detail)


async def get_db(request: Request) -> sessionmaker[Session]:
    return request.app.state.sessions


async def get_write_db(request: Request) -> sessionmaker[Session]:
    return request.app.state.write_sessions


DbDep = Annotated[sessionmaker[Session], Depends(get_db)]
WriteDbDep = Annotated[sessionmaker[Session], Depends(get_write_db)]
"""Sessions: DbDep for reads, WriteDbDep for writes (`with db() as session, session.begin():`). A route
opens its session inside its own (sync) body, so all of a request's database work happens in one worker
thread and the connection goes back to the pool before that thread is released. A session kept across
several thread hops would hold a connection while it waits for a thread; under load, threads waiting for
connections and connections waiting for threads deadlock."""


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A session for a route that makes one or two quick queries (the pages). Closing it (which returns its
    connection) happens right on the event loop, never waiting for a worker thread while holding a
    connection, for the reason DbDep gives."""
    session = request.app.state.sessions()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]


async def get_live(request: Request) -> LiveService:
    return request.app.state.live


LiveDep = Annotated[LiveService, Depends(get_live)]

RunName = Annotated[Text, Path(alias="run", max_length=200, description="the run's name")]
LevelPath = Annotated[int, Path(**LEVEL_BOUNDS, description="0 is the top level (roots)")]
IndexPath = Annotated[int, Path(**INDEX_BOUNDS, description="the feature's index within its level")]
"""A feature's address in a path, for the API and the pages alike (bounds: backend.api.schemas)."""


def find_run(session: Session, name: str) -> Row:
    """The visible run of that name (queries.RUN_COLUMNS), or 404."""
    found = queries.get_run(session, name)
    if found is None:
        raise not_found(f"no run named {name!r}")
    return found


@dataclass(frozen=True)
class Page:
    offset: int
    limit: int


async def paging(
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
) -> Page:
    return Page(offset, limit)


PagingDep = Annotated[Page, Depends(paging)]

_bearer = HTTPBearer(
    auto_error=False,
    description="HSAE_WRITE_TOKEN as a bearer token; a server started with --local needs none",
)


async def require_writer(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    """Allow a write, returning who made it, or refuse it: 401 with a missing or wrong token when one is
    configured; 403 when none is configured, unless the server runs in local mode."""
    if request.app.state.local:
        return "local"
    token = request.app.state.settings.write_token
    if not token:
        raise APIError(
            403,
            "forbidden",
            "writes are disabled on this server: set HSAE_WRITE_TOKEN, or run `hsae serve --local`",
        )
    given = credentials.credentials if credentials is not None else ""
    if not secrets.compare_digest(given.encode(), token.encode()):
        reason = (
            "wrong write token" if given else "this write needs 'Authorization: Bearer <HSAE_WRITE_TOKEN>'"
        )
        raise APIError(401, "unauthorized", reason, headers={"WWW-Authenticate": "Bearer"})
    return "token"


WriterDep = Annotated[str, Depends(require_writer)]
