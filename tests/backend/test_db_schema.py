"""Migrations, the schema-version check, connection errors and the schema's guarantees, on both backends."""

from __future__ import annotations

import os

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import insert, inspect, select, update
from sqlalchemy.exc import IntegrityError

from backend.db.migrate import head_revision
from backend.db.models import AnnotationEvent, Base, Feature, Run, visible_runs
from backend.db.session import (
    DatabaseUnreachableError,
    SchemaVersionError,
    check_schema,
    db_upgrade,
    downgrade,
    make_engine,
    open_database,
    same_database,
    schema_revision,
)
from backend.index.pipeline import prepare_database

TABLES = {"runs", "features", "feature_edges", "contexts", "examples", "annotation_events"}


def _run_row(name: str, complete: bool) -> dict:
    return dict(name=name, model_name="m", layer=3, hook="resid_post", arch="tree",
                checkpoint_digest="d" * 64, config={}, metrics=None, corpus={}, index_settings={},
                level_widths=[2], n_tokens=10, complete=complete)


def _feature_row(run_id: int, idx: int, **extra) -> dict:
    row = dict(run_id=run_id, level=0, idx=idx, child_count=0, fire_count=1, density=0.1, max_act=1.0,
               mean_act=1.0, top_positive=[], top_negative=[], top_tokens_text="", histogram={}, tags=[],
               label=None, note=None)
    return row | extra


def test_upgrade_to_head_and_downgrade_to_base(empty_db_url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the scripts are found from the package, not the working directory
    engine = make_engine(empty_db_url)
    try:
        empty = r"revision <none> \(empty database\), code expects .*: run `hsae db upgrade --db "
        with pytest.raises(SchemaVersionError, match=empty):
            check_schema(engine)
        assert db_upgrade(empty_db_url) == head_revision()
        assert check_schema(engine) == head_revision()
        assert TABLES <= set(inspect(engine).get_table_names())
        assert downgrade(empty_db_url, "base") == "base"
        assert not TABLES & set(inspect(engine).get_table_names())
        with pytest.raises(SchemaVersionError, match="hsae db upgrade"):
            check_schema(engine)
        assert db_upgrade(empty_db_url) == head_revision()  # and back up again
    finally:
        engine.dispose()


def test_rows_survive_migrations_down_and_up(empty_db_url):
    """SQLite batch mode copies tables to change them: with foreign keys on, that would cascade-delete
    rows."""
    db_upgrade(empty_db_url)
    engine = make_engine(empty_db_url)
    try:
        with engine.begin() as conn:
            run_id = conn.scalar(insert(Run).values(**_run_row("kept", True)).returning(Run.id))
            conn.execute(insert(Feature), [_feature_row(run_id, 0), _feature_row(run_id, 1)])
        engine.dispose()
        downgrade(empty_db_url, "0001")
        db_upgrade(empty_db_url)
        with engine.connect() as conn:
            assert conn.scalars(select(Feature.idx).where(Feature.run_id == run_id)).all() == [0, 1]
    finally:
        engine.dispose()


# SQLite cannot reflect the PostgreSQL-only expression index, and Alembic says so.
@pytest.mark.filterwarnings("ignore:autogenerate skipping metadata-specified expression-based index")
def test_models_and_migrations_agree(db_url):
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(context, Base.metadata)
        assert diff == []
    finally:
        engine.dispose()


def test_unknown_revision_is_reported(empty_db_url):
    db_upgrade(empty_db_url)
    engine = make_engine(empty_db_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'ffff'")
        with pytest.raises(SchemaVersionError, match="database at revision ffff, code expects .*newer"):
            open_database(empty_db_url)
        assert schema_revision(engine) == "ffff"
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "url, reason",
    [
        ("postgresql://postgres@127.0.0.1:1/test", "Connection refused"),
        ("sqlite:////nonexistent-dir/sub/x.db", "unable to open database file"),
        ("not a url", "not a database URL"),
        ("mysql://u@localhost/x", "MySQLdb"),
    ],
)
def test_unreachable_database_is_reported(url, reason):
    with pytest.raises(DatabaseUnreachableError, match=rf"cannot connect to .*{reason}"):
        open_database(url)


def test_password_is_hidden_in_errors():
    with pytest.raises(DatabaseUnreachableError) as err:
        open_database("postgresql://alice:s3cret@127.0.0.1:1/test")
    assert "s3cret" not in str(err.value)


def test_upgrade_creates_sqlite_folder(tmp_path):
    url = f"sqlite:///{tmp_path / 'new' / 'dir' / 'hsae.db'}"
    assert db_upgrade(url) == head_revision()
    assert os.path.exists(tmp_path / "new" / "dir" / "hsae.db")


SPELLINGS = [
    "sqlite:///data/hsae.db",  # relative to the working directory
    "sqlite:///./data/../data/hsae.db",
    "sqlite:///{tmp}//data/./hsae.db",  # doubled slash
    "sqlite://///{tmp}/data/hsae.db",  # extra leading slashes
    "sqlite:///{tmp}/link/hsae.db",  # a symlink to the folder
]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_same_sqlite_file_however_spelled(tmp_path, monkeypatch, spelling):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "data")
    default = f"sqlite:///{(tmp_path / 'data' / 'hsae.db').resolve()}"
    assert same_database(spelling.format(tmp=tmp_path), default)
    assert not same_database(f"sqlite:///{tmp_path / 'data' / 'other.db'}", default)
    assert not same_database("sqlite://", "sqlite:///:memory:")  # each in-memory database is its own


def test_same_server_database_however_spelled():
    assert same_database("postgresql://u@LocalHost/hsae", "postgresql+psycopg://u@localhost:5432/hsae")
    assert not same_database("postgresql://u@localhost/hsae", "postgresql://u@localhost:5433/hsae")
    assert not same_database("postgresql://u@localhost/hsae", "postgresql://u@localhost/other")
    assert not same_database("postgresql://u@localhost/hsae", "sqlite:///hsae")


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_index_creates_the_default_database_whichever_way_it_is_spelled(tmp_path, monkeypatch, spelling):
    """`hsae index --db` naming the default SQLite file another way creates and migrates it all the same;
    a database that is not the default one is still never migrated behind the user's back."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "data")
    default = f"sqlite:///{(tmp_path / 'data' / 'hsae.db').resolve()}"
    prepare_database(spelling.format(tmp=tmp_path), default)
    engine = make_engine(default)
    try:
        assert check_schema(engine) == head_revision()
    finally:
        engine.dispose()
    other = f"sqlite:///{tmp_path / 'data' / 'other.db'}"
    with pytest.raises(SchemaVersionError, match=r"revision <none> \(empty database\)"):
        prepare_database(other, default)


def test_sqlite_has_foreign_keys_and_wal(tmp_path):
    url = f"sqlite:///{tmp_path / 'p.db'}"
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        engine.dispose()


def test_one_complete_run_per_name_and_foreign_keys(db_url):
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(insert(Run), [_run_row("dup", True), _run_row("dup", False), _run_row("dup", False)])
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(insert(Run), [_run_row("dup", True)])
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(insert(Feature), [_feature_row(run_id=10**6, idx=0)])  # no such run
        with engine.connect() as conn:
            names = conn.execute(visible_runs().where(Run.name == "dup")).all()
        assert len(names) == 1
    finally:
        engine.dispose()


def test_text_search_is_case_insensitive_on_both(db_url):
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            run_id = conn.scalar(insert(Run).values(**_run_row("search", True)).returning(Run.id))
            conn.execute(insert(Feature), [
                _feature_row(run_id, 0, label="French Words", top_tokens_text="le\nla"),
                _feature_row(run_id, 1, note="fires on numbers", top_tokens_text="Paris\nLyon"),
                _feature_row(run_id, 2, label="100%_sure", top_tokens_text=""),
            ])

        def search(term: str) -> list[int]:
            pattern = "%" + term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            hit = (Feature.label.ilike(pattern, escape="\\") | Feature.note.ilike(pattern, escape="\\")
                   | Feature.top_tokens_text.ilike(pattern, escape="\\"))
            with engine.connect() as conn:
                found = select(Feature.idx).where(Feature.run_id == run_id, hit).order_by(Feature.idx)
                return conn.scalars(found).all()

        assert search("french") == [0]
        assert search("NUMBERS") == [1]
        assert search("paris") == [1]
        assert search("%_") == [2]
    finally:
        engine.dispose()


def test_annotation_history_round_trip(db_url):
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            run_id = conn.scalar(insert(Run).values(**_run_row("annotated", True)).returning(Run.id))
            conn.execute(insert(Feature), [_feature_row(run_id, 0)])
            conn.execute(update(Feature).where(Feature.run_id == run_id).values(label="x", tags=["a", "b"]))
            conn.execute(insert(AnnotationEvent), [dict(
                run_name="annotated", checkpoint_digest="d" * 64, level=0, idx=0, author="me", old_label=None,
                new_label="x", old_note=None, new_note=None, old_tags=[], new_tags=["a", "b"])])
        with engine.connect() as conn:
            event = conn.execute(select(AnnotationEvent).where(AnnotationEvent.run_name == "annotated")).one()
            assert (event.new_label, event.new_tags, event.old_tags) == ("x", ["a", "b"], [])
            assert event.changed_at is not None
            assert conn.scalar(select(Feature.tags).where(Feature.run_id == run_id)) == ["a", "b"]
    finally:
        engine.dispose()
