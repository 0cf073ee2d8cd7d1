"""Database fixtures: every DB test runs on SQLite and, whenever the server at 127.0.0.1:5432 answers, on
PostgreSQL, in databases this session creates (hsae_test_<random>_<n>) and drops at its end, so that other
engineers' test sessions on the same server never see them.

- `db_url`: a database of the parametrized backend, migrated to head, shared by the session (tests use
  distinct run names).
- `empty_db_url`: a brand-new empty database of the parametrized backend, for migration tests.
- `corpus`: three short text files (about 350 tokens) that the real SmolLM2 runs through in seconds, one
  folder per test module.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import create_engine
from sqlalchemy.exc import OperationalError

from backend.db.session import upgrade

POSTGRES_ADMIN_URLS = [f"postgresql+psycopg://{user}@127.0.0.1:5432/test" for user in ("postgres", "root")]


class PostgresServer:
    """Creates throwaway databases from a connection to `test`; drops them all at the end."""

    def __init__(self, admin_url: str):
        self.admin_url = admin_url
        self.engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        self.prefix = f"hsae_test_{uuid.uuid4().hex[:10]}"
        self.created: list[str] = []

    def create_database(self) -> str:
        name = f"{self.prefix}_{len(self.created)}"
        with self.engine.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return self.admin_url.rsplit("/", 1)[0] + f"/{name}"

    def drop_all(self) -> None:
        with self.engine.connect() as conn:
            for name in self.created:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.engine.dispose()


def _answering_admin_url() -> str | None:
    for url in POSTGRES_ADMIN_URLS:
        engine = create_engine(url, connect_args={"connect_timeout": 3})
        try:
            with engine.connect():
                return url
        except OperationalError:
            continue
        finally:
            engine.dispose()
    return None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer | None]:
    admin_url = _answering_admin_url()
    if admin_url is None:
        yield None
        return
    server = PostgresServer(admin_url)
    try:
        yield server
    finally:
        server.drop_all()


def _require(server: PostgresServer | None) -> PostgresServer:
    if server is None:
        pytest.skip("PostgreSQL at 127.0.0.1:5432 does not answer (database `test`, user postgres or root)")
    return server


@pytest.fixture(scope="session")
def migrated_databases(postgres_server, tmp_path_factory) -> Callable[[str], str]:
    """One database per backend for the whole session, created and migrated on first use."""
    urls: dict[str, str] = {}

    def get(backend: str) -> str:
        if backend not in urls:
            if backend == "sqlite":
                url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'hsae.db'}"
            else:
                url = _require(postgres_server).create_database()
            upgrade(url)
            urls[backend] = url
        return urls[backend]

    return get


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_backend(request) -> str:
    return request.param


@pytest.fixture
def db_url(db_backend, migrated_databases) -> str:
    return migrated_databases(db_backend)


@pytest.fixture
def empty_db_url(db_backend, postgres_server, tmp_path) -> str:
    if db_backend == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.db'}"
    return _require(postgres_server).create_database()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("index-corpus")
    texts = {
        "animals.txt": "The cat chased the mouse. The dog barked at the cat. Birds sing in the morning. " * 5,
        "cities.txt": "Paris, London and Berlin are capitals. Rome is old. Tokyo is large and busy. " * 5,
        "numbers.txt": "One, two, three, four, five. Seven plus eight is fifteen. Ten times ten. " * 5,
    }
    for name, text in texts.items():
        (folder / name).write_text(text)
    return str(folder)
