"""`hsae serve`: the API (and pages) under uvicorn, after checking that the database schema is current."""

from __future__ import annotations

import ipaddress
import os

from backend.app import create_app, preload_specs
from backend.db.session import describe_url, open_database, session_factory
from backend.settings import get_settings
from trainer.errors import HSAEError

LOCAL_HOST = "127.0.0.1"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def serve(
    db_url: str | None = None,
    host: str | None = None,
    port: int = DEFAULT_PORT,
    local: bool = False,
    log_level: str = "info",
    live_preload: str | None = None,
) -> None:
    """Serve until interrupted. `local`: listen on 127.0.0.1 only and allow writes without a token.
    `live_preload`: runs whose live models load before the server answers (Settings.live_preload)."""
    import uvicorn

    from backend.http_protocol import NoDelayH11Protocol

    if local and host is not None and not _is_loopback(host):
        raise HSAEError(f"--local serves on {LOCAL_HOST} only (writes need no token); drop --host {host}")
    host = LOCAL_HOST if local else (host or DEFAULT_HOST)
    settings = get_settings()
    if db_url is not None:
        settings = settings.model_copy(update={"database_url": db_url})
    if live_preload is not None:
        settings = settings.model_copy(update={"live_preload": live_preload})
    if settings.live_cpu_threads is None:  # this process serves: leave a core to the web server and database
        settings = settings.model_copy(update={"live_cpu_threads": max(1, (os.cpu_count() or 2) - 1)})
    engine = open_database(settings.resolved_database_url)  # a schema not at head stops here, with the fix
    try:
        if settings.live_preload:  # a run that cannot go live stops here too, in one line
            preload_specs(session_factory(engine), settings)
    finally:
        engine.dispose()
    app = create_app(settings, local=local)
    mode = (
        "local mode: writes allowed without a token"
        if local
        else (
            "writes need the bearer token HSAE_WRITE_TOKEN"
            if settings.write_token
            else "read-only: no HSAE_WRITE_TOKEN"
        )
    )
    if settings.live_preload:
        print(f"loading the live models of {settings.live_preload} before serving", flush=True)
    print(
        f"HSAE Forest on http://{host}:{port} ({describe_url(settings.resolved_database_url)}; {mode})",
        flush=True,
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                http=NoDelayH11Protocol)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
