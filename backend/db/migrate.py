"""Alembic, configured in code: the migration scripts live in <repo>/alembic, found from this package, so
`hsae db upgrade` works from any working directory and needs no alembic.ini."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection

SCRIPT_LOCATION = Path(__file__).resolve().parents[2] / "alembic"


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic Config for our scripts; given a connection, env.py migrates in it and its transaction."""
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations found under {SCRIPT_LOCATION}")
    return head


def known_revisions() -> set[str]:
    return {script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()}


def current_revision(connection: Connection) -> str | None:
    """The revision stamped in the database; None for a database Alembic never touched."""
    return MigrationContext.configure(connection).get_current_revision()


def run_upgrade(connection: Connection, revision: str = "head") -> None:
    command.upgrade(alembic_config(connection), revision)


def run_downgrade(connection: Connection, revision: str) -> None:
    command.downgrade(alembic_config(connection), revision)
