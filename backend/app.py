"""The FastAPI application: `create_app` wires settings, the database, the live service, the API routers,
the pages and static files (backend/pages.py), the error handlers and the request body limit.

Every error answers JSON {"error", "detail"} (ErrorBody); no request can make the server print a traceback
to the client. Request bodies are refused (413) from their Content-Length before they are read, and a body
streamed without one is cut off as soon as it passes the limit.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import Engine
from sqlalchemy.exc import DataError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend import pages, queries
from backend.api.cache import AnswerCache
from backend.api.deps import APIError
from backend.api.routes import API_ROUTERS, ROOT_ROUTERS
from backend.db.session import make_engine, session_factory
from backend.live import LiveError, LiveRunSpec, LiveService, LiveUnavailable
from backend.settings import Settings, get_settings

API_PREFIX = "/api/v1"
log = logging.getLogger("hsae.api")

ERROR_NAMES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    503: "unavailable",
    504: "timeout",
}


def create_app(settings: Settings | None = None, *, local: bool = False) -> FastAPI:
    """The application for `settings` (default: from the environment). `local`: writes need no token (the
    server must then listen on 127.0.0.1 only; `backend.server.serve` sees to that)."""
    settings = settings or get_settings()
    engine = make_engine(settings.resolved_database_url)
    read_engine = _read_engine(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Sync routes run in anyio's thread pool, 40 threads by default. Python runs one at a time; on two
        # cores, 4 threads instead of 40 served twice the requests per second under 50 concurrent clients
        # (threads mostly overlap database round trips, and more of them only contend for the GIL).
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        if settings.live_preload:
            specs = await anyio.to_thread.run_sync(preload_specs, app.state.sessions, settings)
            for spec in specs:
                try:
                    seconds = await app.state.live.preload(spec)
                except LiveUnavailable as err:
                    if settings.live_preload.strip() != "*":  # a run asked for by name must go live
                        raise
                    log.warning("live model not preloaded: %s", err)
                else:
                    log.warning("live model of run %r loaded and warmed up in %.1f s", spec.name, seconds)
        yield
        await app.state.live.close()
        read_engine.dispose()
        engine.dispose()

    app = FastAPI(
        title="HSAE Forest",
        version="1",
        summary="Browse, search, annotate and export the features of hierarchical sparse autoencoders.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.local = local
    app.state.engine = engine
    app.state.sessions = session_factory(read_engine)
    app.state.write_sessions = session_factory(engine)
    app.state.live = LiveService(settings)
    app.state.answers = AnswerCache(settings.api_cache_bytes)

    for router in API_ROUTERS:
        app.include_router(router, prefix=API_PREFIX)
    for router in ROOT_ROUTERS:
        app.include_router(router)
    app.include_router(pages.router)
    pages.mount_frontend(app)

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, import_limit=settings.max_import_bytes)
    _add_error_handlers(app)
    return app


def preload_specs(sessions: sessionmaker[Session], settings: Settings) -> list[LiveRunSpec]:
    """The runs `settings.live_preload` names ("*": the newest with a checkpoint, those that load), at most as
    many as the live service keeps; a name that is not a run that can go live stops the start
    (LiveUnavailable)."""
    names = [name.strip() for name in settings.live_preload.split(",") if name.strip()]
    with sessions() as session:
        if names == ["*"]:
            runs = list(queries.newest_live_runs(session, settings.live_cached_runs))
        else:
            if len(names) > settings.live_cached_runs:
                raise LiveUnavailable(
                    f"{len(names)} runs to preload, but the live service keeps {settings.live_cached_runs} "
                    "(HSAE_LIVE_CACHED_RUNS)"
                )
            runs = []
            for name in names:
                run = queries.get_run(session, name)
                if run is None or not run.checkpoint_path:
                    why = "no such run" if run is None else "it has no checkpoint path (re-index it)"
                    raise LiveUnavailable(f"cannot preload the live model of run {name!r}: {why}")
                runs.append(run)
    return [LiveRunSpec(r.name, r.model_name, r.layer, r.checkpoint_path, r.checkpoint_digest) for r in runs]


def _read_engine(engine: Engine) -> Engine:
    """The engine for reads. On PostgreSQL: autocommit, without a liveness ping at checkout, which saves three
    of a request's round trips (ping, BEGIN, ROLLBACK; a transaction under READ COMMITTED gives reads no
    common snapshot anyway). A connection that died with a server restart fails one request (503), and the
    pool is then renewed. SQLite reads keep their transaction: there it is the snapshot, and costs no trip."""
    if engine.dialect.name != "postgresql":
        return engine
    return make_engine(engine.url, isolation_level="AUTOCOMMIT", pool_pre_ping=False)


# ---- errors ----------------------------------------------------------------------------------------------
def error_response(
    status: int, error: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail, **extra}, status_code=status, headers=headers)


def _error_name(status: int) -> str:
    return ERROR_NAMES.get(status) or HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.error, exc.detail, exc.headers)

    @app.exception_handler(LiveError)
    async def live_error(_request: Request, exc: LiveError) -> JSONResponse:
        return error_response(exc.status, exc.code, str(exc), exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        return error_response(exc.status_code, _error_name(exc.status_code), detail, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        issues = [
            {
                "loc": [p if isinstance(p, int) else str(p) for p in e.get("loc", ())],
                "msg": str(e.get("msg", "")),
                "type": str(e.get("type", "")),
            }
            for e in exc.errors()
        ]
        detail = "; ".join(
            f"{'.'.join(str(p) for p in issue['loc'])}: {issue['msg']}" for issue in issues[:5]
        )
        return error_response(422, "invalid_request", detail or "invalid request", errors=issues)

    @app.exception_handler(DataError)
    async def data_error(_request: Request, _exc: DataError) -> JSONResponse:
        # The wire models keep values within what the databases store; this is the net under them.
        return error_response(422, "invalid_request", "a value is out of the range the database can store")

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def database_down(_request: Request, exc: Exception) -> JSONResponse:
        log.error("database error: %s", exc)
        return error_response(
            503, "unavailable", "the database does not answer; try again later", {"Retry-After": "5"}
        )

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error", exc_info=exc)
        return error_response(500, "internal_error", "internal server error")


# ---- request body limit ----------------------------------------------------------------------------------
class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body exceeds the limit of {limit} bytes")


class BodyLimit:
    """Refuse bodies over `limit` bytes (`import_limit` for imports): at once from Content-Length, else as
    soon as the streamed body passes the limit, without reading the rest."""

    def __init__(self, app: ASGIApp, limit: int, import_limit: int):
        self.app, self.limit, self.import_limit = app, limit, import_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.import_limit if scope["path"].endswith("/import") else self.limit
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _send_json(send, 413, "too_large", BodyTooLarge(limit).detail)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:
            if started:
                raise
            await _send_json(send, 413, "too_large", exc.detail)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_json(send: Send, status: int, error: str, detail: str) -> None:
    response = error_response(status, error, detail, {"Connection": "close"})
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})
