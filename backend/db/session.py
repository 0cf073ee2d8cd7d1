"""Engines for SQLite (the default) and PostgreSQL, the schema-version check, and upgrade/downgrade.

Everything that opens the database goes through `make_engine`, so both backends behave alike: SQLite gets
foreign keys, WAL (readers never block on the indexer's writes) and real transactions (SQLAlchemy emits BEGIN,
so a reader's SELECTs in one transaction see one snapshot: the old run or its replacement, never a mix). On
PostgreSQL that needs isolation_level="REPEATABLE READ" for the read transaction (default: READ COMMITTED).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sqlalchemy import URL, Connection, Engine, create_engine, event, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from backend.db.migrate import current_revision, head_revision, known_revisions, run_downgrade, run_upgrade
from trainer.errors import HSAEError

SQLITE_BUSY_TIMEOUT_S = 30
POSTGRES_CONNECT_TIMEOUT_S = 10


class DatabaseUnreachableError(HSAEError):
    """The URL is malformed or the server/file cannot be opened."""


class SchemaVersionError(HSAEError):
    """The database schema is not at the revision this code expects."""


def normalize_url(url: str | URL) -> URL:
    """Parse a URL; a bare postgresql:// gets the psycopg 3 driver we install (not SQLAlchemy's psycopg2)."""
    try:
        parsed = make_url(url)
    except ArgumentError as err:
        raise DatabaseUnreachableError(f"cannot connect to {url!s}: not a database URL ({err})") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def same_database(a: str | URL, b: str | URL) -> bool:
    """Whether two URLs name the same database, however spelled: a SQLite file by its resolved path (relative
    to the working directory, with `.`, `..`, doubled slashes and symlinks resolved; an in-memory database is
    never shared), a server database by backend, host, port (its default if none), user and name."""
    url_a, url_b = normalize_url(a), normalize_url(b)
    backend = url_a.get_backend_name()
    if backend != url_b.get_backend_name():
        return False
    if backend == "sqlite":
        path_a, path_b = _sqlite_path(url_a), _sqlite_path(url_b)
        return path_a is not None and path_a == path_b
    return _server_database(url_a) == _server_database(url_b)


def _sqlite_path(url: URL) -> str | None:
    if url.database in (None, "", ":memory:"):
        return None
    return os.path.realpath(url.database)


def _server_database(url: URL) -> tuple[Any, ...]:
    default_port = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306}.get(url.get_backend_name())
    return (url.username, url.host.lower() if url.host else None, url.port or default_port, url.database)


def describe_url(url: str | URL) -> str:
    """The URL as it may be printed: password hidden."""
    try:
        return normalize_url(url).render_as_string(hide_password=True)
    except DatabaseUnreachableError:
        return str(url)


def make_engine(url: str | URL, *, enforce_foreign_keys: bool = True, **engine_kwargs: Any) -> Engine:
    """An Engine for `url`; lazy (nothing connects until used). `open_database` also checks the schema."""
    parsed = normalize_url(url)
    connect_args: dict[str, Any] = dict(engine_kwargs.pop("connect_args", {}))
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT_S)
    else:
        engine_kwargs.setdefault("pool_pre_ping", True)
        if backend == "postgresql" and "connect_timeout" not in parsed.query:
            connect_args.setdefault("connect_timeout", POSTGRES_CONNECT_TIMEOUT_S)
    engine_kwargs.setdefault("json_serializer", compact_json)
    try:
        engine = create_engine(parsed, connect_args=connect_args, **engine_kwargs)
    except (ArgumentError, ImportError) as err:  # unknown dialect, or its driver is not installed
        raise DatabaseUnreachableError(f"cannot connect to {describe_url(parsed)}: {err}") from None
    if backend == "sqlite":
        _configure_sqlite(engine, enforce_foreign_keys=enforce_foreign_keys)
    return engine


def compact_json(value: Any) -> str:
    """How JSON columns are written: no spaces after separators (examples are long lists of numbers)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _configure_sqlite(engine: Engine, *, enforce_foreign_keys: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take BEGIN away from the sqlite3 module (which skips it for SELECT and DDL); `_on_begin` emits it.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA foreign_keys={'ON' if enforce_foreign_keys else 'OFF'}")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; safe with WAL
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN")


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def _unreachable(url: str | URL, err: DBAPIError) -> DatabaseUnreachableError:
    reason = " ".join(str(err.orig).split()) if err.orig is not None else str(err)
    return DatabaseUnreachableError(f"cannot connect to {describe_url(url)}: {reason}")


def connect(engine: Engine) -> Connection:
    """engine.connect(), with a failure to reach the database reported as DatabaseUnreachableError."""
    try:
        return engine.connect()
    except DBAPIError as err:
        raise _unreachable(engine.url, err) from None


def schema_revision(engine: Engine) -> str | None:
    """The database's current revision (None when empty); raises DatabaseUnreachableError."""
    with connect(engine) as conn:
        try:
            return current_revision(conn)
        except DBAPIError as err:  # e.g. a file that is not a SQLite database
            raise _unreachable(engine.url, err) from None


def check_schema(engine: Engine) -> str:
    """Raise unless the database is at the head revision; return that revision."""
    current, head = schema_revision(engine), head_revision()
    if current == head:
        return head
    url = describe_url(engine.url)
    if current is not None and current not in known_revisions():
        raise SchemaVersionError(
            f"database at revision {current}, code expects {head}: the database was migrated by a newer "
            f"version of hsae; use that version with {url}"
        )
    shown = current if current is not None else "<none> (empty database)"
    raise SchemaVersionError(
        f"database at revision {shown}, code expects {head}: run `hsae db upgrade --db {url}`"
    )


def open_database(url: str | URL) -> Engine:
    """make_engine + check_schema: the way the server and the indexer open the database."""
    engine = make_engine(url)
    try:
        check_schema(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine


def _migrate(url: str | URL, migrate_fn: Any, revision: str) -> str:
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    # Foreign keys off while migrating: SQLite batch mode recreates tables, which must not cascade or fail.
    engine = make_engine(parsed, enforce_foreign_keys=False)
    try:
        with connect(engine) as conn:
            with conn.begin():
                migrate_fn(conn, revision)
                if engine.dialect.name == "sqlite":
                    violations = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if violations:
                        raise SchemaVersionError(f"migration left foreign key violations: {violations[:5]}")
            return current_revision(conn) or "base"
    finally:
        engine.dispose()


def upgrade(url: str | URL, revision: str = "head") -> str:
    """Migrate the database up to `revision` (creating a SQLite file and its folder if needed); return it."""
    return _migrate(url, run_upgrade, revision)


def downgrade(url: str | URL, revision: str) -> str:
    """Migrate the database down to `revision` ("base" drops everything); return the resulting revision."""
    return _migrate(url, run_downgrade, revision)


def db_upgrade(url: str) -> str:
    """`hsae db upgrade --db URL`: migrate to head and return the resulting revision."""
    return upgrade(url)
