"""`hsae index`: open the checkpoint, make sure the database can take the run, index the checkpoint
(trainer.index.pipeline, which knows nothing of databases), and publish the run in one atomic step.

Under torchrun every rank indexes its share of the contexts and rank 0 alone, having merged them, touches
the database (`torchrun --nproc-per-node N hsae index RUN`; gloo on CPU, NCCL on GPUs)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from backend.db.session import db_upgrade, open_database, same_database
from backend.index.writer import write_run
from trainer import checkpoint, distributed
from trainer.index.accumulate import IndexConfig
from trainer.index.pipeline import check_run_name, index_run
from trainer.index.saelens import DEFAULT_UNASSIGNED, check_model, index_saes, load_model_for, open_saes
from trainer.lm import resolve_device


@dataclass
class IndexSummary:
    run_id: int
    name: str
    tokens: int
    contexts: int
    seconds: float = 0.0  # the whole index run
    write_seconds: float = 0.0  # of which writing to the database


def prepare_database(url: str, default_url: str) -> None:
    """The embedded default database is created on first use, whichever way its URL is spelled; any other
    must already be at our schema."""
    if same_database(url, default_url):
        db_upgrade(url)
    open_database(url).dispose()


def _write(db_url: str, indexed, replace: bool) -> int:
    with tqdm(desc="writing", unit=" rows", unit_scale=True) as bar:
        def progress(stage: str, done: int, total: int) -> None:
            bar.set_description(f"writing {stage}")
            bar.total = total
            bar.n = done
            bar.refresh()

        return write_run(db_url, indexed.result, indexed.info, indexed.contexts,
                         output_tokens=indexed.output_tokens, edge_cosines=indexed.edge_cosines,
                         relative_cosines=indexed.relative_cosines, replace=replace, progress=progress)


def index_sae_folders(
    sae_dirs: list[Path],
    *,
    db_url: str,
    default_db_url: str,
    name: str,
    model: str | None = None,
    layer: int | None = None,
    corpus: str | None = None,
    tokens: int = 100_000,
    unassigned_fraction: float = DEFAULT_UNASSIGNED,
    replace: bool = False,
    device: str = "auto",
    config: IndexConfig | None = None,
) -> IndexSummary:
    """`hsae index-sae`: every check (folders, hooks, widths, the model) before the database is touched."""
    started = time.perf_counter()
    check_run_name(name)
    family = open_saes(sae_dirs, model=model, layer=layer, device=resolve_device(device))
    check_model(family)  # its config only: width and depth
    prepare_database(db_url, default_db_url)  # before the weights load: a database that cannot take it
    lm = load_model_for(family, device)
    indexed = index_saes(family, lm, name=name, corpus=corpus, tokens=tokens,
                         unassigned_fraction=unassigned_fraction, config=config)
    writing = time.perf_counter()
    run_id = _write(db_url, indexed, replace)
    done = time.perf_counter()
    return IndexSummary(run_id=run_id, name=indexed.info.name, tokens=indexed.tokens,
                        contexts=indexed.n_contexts, seconds=done - started, write_seconds=done - writing)


def index_checkpoint(
    run_dir: Path,
    *,
    db_url: str,
    default_db_url: str,
    corpus: str | None = None,
    tokens: int = 100_000,
    name: str | None = None,
    replace: bool = False,
    device: str = "auto",
    config: IndexConfig | None = None,
) -> IndexSummary:
    """Under torchrun, ranks other than 0 return a summary with run_id -1 once their share is merged."""
    world, joined = distributed.init_from_env(device)
    try:
        return _index_checkpoint(run_dir, db_url, default_db_url, corpus, tokens, name, replace, device,
                                 config, world)
    finally:
        if joined:
            distributed.close()


def _index_checkpoint(run_dir, db_url, default_db_url, corpus, tokens, name, replace, device, config,
                      world: distributed.World) -> IndexSummary:
    started = time.perf_counter()
    ckpt = checkpoint.open(Path(run_dir).resolve(), device=resolve_device(device))
    # Before the long part: a database that cannot take it stops here (rank 0 alone touches it; when rank 0
    # exits with that error, torchrun stops the other ranks).
    if world.is_main:
        prepare_database(db_url, default_db_url)
    indexed = index_run(ckpt, corpus=corpus, tokens=tokens, name=name, device=device, config=config)
    if indexed is None:
        return IndexSummary(run_id=-1, name=name or Path(run_dir).name, tokens=0, contexts=0,
                            seconds=time.perf_counter() - started)
    writing = time.perf_counter()
    run_id = _write(db_url, indexed, replace)
    done = time.perf_counter()
    return IndexSummary(
        run_id=run_id, name=indexed.info.name, tokens=indexed.tokens, contexts=indexed.n_contexts,
        seconds=done - started, write_seconds=done - writing,
    )
