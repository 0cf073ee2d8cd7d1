"""Alembic environment. `backend.db.session.upgrade/downgrade` hand us an open connection (and transaction);
the plain `alembic` command (alembic.ini at the repo root) uses -x db=URL, else HSAE_DATABASE_URL or the
default database."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context

from backend.db.models import Base

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)
target_metadata = Base.metadata


def _configure_and_run(connection) -> None:
    # render_as_batch: SQLite cannot ALTER most things, so changes are made by copying tables.
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def _url_from_command_line() -> str:
    from backend.settings import get_settings

    return context.get_x_argument(as_dictionary=True).get("db") or get_settings().resolved_database_url


if context.is_offline_mode():
    context.configure(url=_url_from_command_line(), target_metadata=target_metadata, render_as_batch=True,
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
elif (connection := config.attributes.get("connection")) is not None:
    _configure_and_run(connection)
else:
    from backend.db.session import make_engine

    engine = make_engine(_url_from_command_line(), enforce_foreign_keys=False)
    try:
        with engine.connect() as conn:
            _configure_and_run(conn)
            conn.commit()
    finally:
        engine.dispose()
