"""`hsae index` under torchrun: 2 gloo ranks on CPU, each encoding half of the contexts, publish the same run
as one process does (trainer/index/pipeline.py), in the same database (SQLite and PostgreSQL)."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.db.models import Context, Example, Feature, FeatureEdge, FeatureRelative, Run
from backend.db.session import make_engine
from backend.index.pipeline import index_checkpoint
from trainer.config import ArchConfig, RunConfig, TrainConfig
from trainer.sources import DataSpec
from trainer.workflows import run_training

REPO = Path(__file__).resolve().parents[2]
TOKENS = 100_000


@pytest.fixture(scope="module")
def trained_run(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ranks-runs") / "tree-small"
    cfg = RunConfig(
        ArchConfig(arch="tree", levels=[16, 64], level_k=[4, 4]),
        TrainConfig(batch_size=64, steps=30, seed=0, device="cpu", progress=False, checkpoint_every=0),
    )
    run_training(DataSpec(layer=6, corpus=corpus, tokens=TOKENS, context_len=32, device="cpu"), cfg, run_dir)
    return run_dir


def _rows(session: Session, table, run_id: int) -> list[dict]:
    columns = [c for c in table.__table__.columns if c.name != "run_id"]
    keys = [c for c in columns if c.primary_key]
    query = select(*columns).where(table.run_id == run_id).order_by(*keys)
    return [dict(row._mapping) for row in session.execute(query)]


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)  # sums over the contexts in another order
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def test_two_ranks_publish_what_one_process_publishes(db_url, trained_run, corpus):
    index_checkpoint(trained_run, db_url=db_url, default_db_url="sqlite:///unused.db", corpus=corpus,
                     tokens=TOKENS, name="one-process", device="cpu")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "backend.cli", "index", str(trained_run), "--db", db_url, "--corpus", corpus,
               "--tokens", str(TOKENS), "--name", "two-ranks", "--device", "cpu"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("indexed run 'two-ranks'") == 1, done.stdout  # rank 0 speaks for the run

    engine = make_engine(db_url)
    try:
        with Session(engine) as session:
            runs = {r.name: r for r in session.scalars(select(Run).where(Run.name.in_(["one-process",
                                                                                        "two-ranks"])))}
            one, two = runs["one-process"], runs["two-ranks"]
            assert two.complete and two.n_tokens == one.n_tokens > 0
            assert two.corpus == one.corpus
            contexts = _rows(session, Context, one.id)
            assert len({c["context_id"] % 2 for c in contexts}) == 2  # contexts of both ranks' shares
            for table in (Feature, FeatureEdge, FeatureRelative, Example, Context):
                mine, theirs = _rows(session, table, one.id), _rows(session, table, two.id)
                assert len(mine) == len(theirs) > 0, table.__name__
                for a, b in zip(mine, theirs):
                    assert _same(a, b), (table.__name__, a, b)
    finally:
        engine.dispose()
