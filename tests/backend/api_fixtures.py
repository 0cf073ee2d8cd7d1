"""Fixtures for the API tests: a migrated database per backend (SQLite always, PostgreSQL when it answers),
a small synthetic indexed run written with plain ORM inserts, and app clients.

Test modules import the fixtures they use from here (`from tests.backend.api_fixtures import ...`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from backend.app import create_app
from backend.db.models import Context, Example, Feature, FeatureEdge, Run
from backend.db.session import make_engine, session_factory, upgrade
from backend.settings import Settings

PG_HOST, PG_PORT = "127.0.0.1", 5432
WRITE_TOKEN = "test-token-0123456789"
RUN_NAME = "synth"
CONTEXT_LEN = 8


# ---- databases -------------------------------------------------------------------------------------------
# `postgres_server` (tests/backend/conftest.py) makes throwaway PostgreSQL databases, dropped at the end.
@pytest.fixture(scope="session")
def new_database(postgres_server, tmp_path_factory):
    """new_database(backend) -> URL of a new database migrated to head."""

    def create(backend: str) -> str:
        if backend == "sqlite":
            url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'hsae.db'}"
        elif postgres_server is None:
            pytest.skip(f"PostgreSQL does not answer at {PG_HOST}:{PG_PORT}")
        else:
            url = postgres_server.create_database()
        upgrade(url)
        return url

    return create


BACKENDS = [pytest.param("sqlite"), pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(scope="session", params=BACKENDS)
def api_db_url(request, new_database) -> str:
    """A database per backend holding only the synthetic run, shared by the session (tests that write
    annotate features of their own)."""
    url = new_database(request.param)
    with session_scope(url) as session:
        make_run(session)
    return url


class session_scope:
    def __init__(self, url: str):
        self.engine = make_engine(url)

    def __enter__(self) -> Session:
        self.session = session_factory(self.engine)()
        return self.session

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.session.commit()
        self.session.close()
        self.engine.dispose()


# ---- a synthetic run -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SynthRun:
    """Sizes of the synthetic run: `roots` parents with `children` each (as MoE: child = parent·C + slot)."""

    name: str = RUN_NAME
    roots: int = 12
    children: int = 4
    top_examples: int = 3
    quantile_buckets: int = 2
    digest: str = hashlib.sha256(b"synthetic weights").hexdigest()
    model: str = "synthetic-lm"
    layer: int = 3
    arch: str = "moe"
    checkpoint_path: str | None = None

    @property
    def level_widths(self) -> list[int]:
        return [self.roots, self.roots * self.children]


WORDS = ["cat", "dog", "Paris", "river", "%", "_", "O'Brien", "<b>", "naïve", "日本", "DROP", "tree"]


def top_tokens(level: int, idx: int) -> list[list]:
    """Deterministic output tokens; root r promotes WORDS[r] first, so searching a word finds its root."""
    first = WORDS[idx % len(WORDS)] if level == 0 else f"tok{level}_{idx}"
    return [[first, 5.0], [f"out{level}x{idx}", 4.0], [" the", 3.0]]


def make_run(session: Session, synth: SynthRun = SynthRun(), *, complete: bool = True) -> Run:
    run = Run(
        name=synth.name,
        model_name=synth.model,
        layer=synth.layer,
        hook=f"blocks.{synth.layer}.hook_resid_post",
        arch=synth.arch,
        checkpoint_digest=synth.digest,
        checkpoint_path=synth.checkpoint_path,
        config={"format": "hsae-checkpoint", "arch": synth.arch},
        metrics={"explained_variance": 0.8},
        corpus={"spec": "synthetic", "context_len": CONTEXT_LEN},
        index_settings={"top_k": synth.top_examples},
        level_widths=synth.level_widths,
        n_tokens=10_000,
        complete=complete,
    )
    session.add(run)
    session.flush()
    features, edges = [], []
    for level, width in enumerate(synth.level_widths):
        for idx in range(width):
            parent = idx // synth.children if level == 1 else None
            fire = 0 if (level, idx) == (0, synth.roots - 1) else 100 + 7 * idx + 50 * level
            positive = top_tokens(level, idx)
            features.append(
                Feature(
                    run_id=run.id,
                    level=level,
                    idx=idx,
                    parent_level=0 if parent is not None else None,
                    parent_idx=parent,
                    child_count=synth.children if level == 0 else 0,
                    fire_count=fire,
                    density=fire / 10_000,
                    max_act=0.0 if fire == 0 else 1.0 + idx % 5,
                    mean_act=0.0 if fire == 0 else 0.5,
                    top_positive=positive,
                    top_negative=[[f"neg{level}_{idx}", -2.0]],
                    top_tokens_text="\n".join(token for token, _ in positive),
                    histogram={"edges": [0.0, 1.0, 2.0], "counts": [fire // 2, fire - fire // 2]},
                    label=f"root {idx}" if level == 0 and idx % 2 == 0 else None,
                    note="a note about rivers" if (level, idx) == (0, 2) else None,
                    tags=["seed"] if (level, idx) == (0, 0) else [],
                )
            )
            if parent is not None:
                edges.append(
                    FeatureEdge(
                        run_id=run.id,
                        child_level=1,
                        child_idx=idx,
                        parent_level=0,
                        parent_idx=parent,
                        coactive_count=fire // 2,
                        p_parent_given_child=0.9,
                        p_child_given_parent=0.2,
                        decoder_cosine=0.5,
                    )
                )
    session.add_all(features[: synth.roots])
    session.flush()  # parents before children (the self-referencing foreign key)
    session.add_all(features[synth.roots :])
    session.flush()
    session.add_all(edges)
    contexts = [
        Context(
            run_id=run.id,
            context_id=c,
            tokens=[f"w{c}_{t}" for t in range(CONTEXT_LEN)],
            doc_id=f"doc{c % 3}",
            start=c * CONTEXT_LEN,
        )
        for c in range(10)
    ]
    session.add_all(contexts)
    session.flush()
    examples = []
    for feature in features:
        if feature.fire_count == 0:
            continue
        shown = [("top", 0, r) for r in range(synth.top_examples)]
        shown += [("quantile", b, 0) for b in range(synth.quantile_buckets)]
        for n, (kind, bucket, rank) in enumerate(shown):
            context_id = (feature.idx + n) % len(contexts)
            values = [0.0] * CONTEXT_LEN
            values[n % CONTEXT_LEN] = feature.max_act - 0.1 * n
            examples.append(
                Example(
                    run_id=run.id,
                    level=feature.level,
                    idx=feature.idx,
                    kind=kind,
                    bucket=bucket,
                    rank=rank,
                    context_id=context_id,
                    token_values=values,
                    max_value=values[n % CONTEXT_LEN],
                    max_position=n % CONTEXT_LEN,
                )
            )
    session.add_all(examples)
    session.flush()
    return run


# ---- apps ------------------------------------------------------------------------------------------------
def app_settings(url: str, **overrides) -> Settings:
    return Settings(database_url=url, data_dir=Path(os.environ["HSAE_DATA_DIR"]), **overrides)


@pytest.fixture()
def client(api_db_url) -> Iterator[TestClient]:
    """A client of the shared database; the server has a write token configured."""
    with TestClient(create_app(app_settings(api_db_url, write_token=WRITE_TOKEN))) as test_client:
        yield test_client


def auth(token: str = WRITE_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
