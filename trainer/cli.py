"""`hsae`: the command line (docs/contracts.md#contract-1-command-line).

Commands stay thin: they parse, then call the library."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import click
import typer

from trainer.errors import HSAEError

app = typer.Typer(
    help="Train, evaluate, index and explore hierarchical sparse autoencoders.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_app = typer.Typer(help="Database schema (owned by Alembic migrations).", no_args_is_help=True)
app.add_typer(db_app, name="db")

Model = Annotated[str | None, typer.Option(help="Hugging Face causal LM name or local path [default: bundled SmolLM2-135M].")]
Layer = Annotated[int | None, typer.Option(help="Block whose residual-stream output is captured [default: 15].")]
Corpus = Annotated[str | None, typer.Option(help="demo, a .txt file, a folder, a .jsonl (text field) or hf:NAME[:split].")]
Activations = Annotated[Path | None, typer.Option(help="A float [N, d] matrix (.npy, or .safetensors tensor 'activations').")]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
DbUrl = Annotated[str | None, typer.Option("--db", help="SQLAlchemy URL [default: $HSAE_DATABASE_URL or SQLite under the data dir].")]


def _db_url(db: str | None) -> str:
    from trainer.settings import get_settings

    return db or get_settings().resolved_database_url


@app.command("train")
def train_cmd(
    arch: Annotated[str | None, typer.Option(help="moe, tree or topk [default: moe].")] = None,
    model: Model = None,
    layer: Layer = None,
    corpus: Corpus = None,
    activations: Activations = None,
    tokens: Annotated[int | None, typer.Option(help="Tokens of activations to draw from the corpus [default: 200000].")] = None,
    out: Annotated[Path | None, typer.Option(help="Run directory [default: data/runs/<arch>-<time>].")] = None,
    device: Device = "auto",
    seed: Annotated[int | None, typer.Option(help="Random seed (initialisation and data order).")] = None,
    config: Annotated[Path | None, typer.Option(help='JSON file {"arch": {...}, "train": {...}}; flags override it.')] = None,
    preset: Annotated[str | None, typer.Option(help="project (measured defaults) or paper (each paper's settings) [default: project].")] = None,
    width: Annotated[int | None, typer.Option(help="Flat width, or the number of parents for moe.")] = None,
    k: Annotated[int | None, typer.Option(help="Active latents per token at the top level.")] = None,
    children: Annotated[int | None, typer.Option(help="moe: children per parent.")] = None,
    subspace: Annotated[int | None, typer.Option(help="moe: subspace dimension of each expert.")] = None,
    levels: Annotated[str | None, typer.Option(help="tree: widths top to bottom, e.g. 512,1024,2048.")] = None,
    batch: Annotated[int | None, typer.Option(help="Batch size (tokens per step).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps [default: one pass over the data].")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
) -> None:
    """Train an HSAE; prints the run directory as the last line."""
    from trainer.sources import DEFAULT_TOKENS, DataSpec
    from trainer.workflows import build_run_config, run_training

    level_list = None
    if levels is not None:
        try:
            level_list = [int(w) for w in levels.split(",") if w.strip()]
        except ValueError:
            raise HSAEError(f"--levels must be comma-separated integers, got {levels!r}") from None
    run_cfg = build_run_config(
        config, arch,
        {"width": width, "k": k, "children": children, "subspace": subspace, "levels": level_list},
        {"seed": seed, "batch_size": batch, "lr": lr, "steps": steps, "device": device},
        preset,
    )
    data = DataSpec(
        model=model or DataSpec.model, layer=15 if layer is None else layer, corpus=corpus,
        activations=str(activations) if activations else None, tokens=tokens or DEFAULT_TOKENS, device=device,
    )
    run_dir = run_training(data, run_cfg, out, resume=resume)
    print(run_dir)


@app.command("eval")
def eval_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A checkpoint directory.")],
    corpus: Corpus = None,
    activations: Activations = None,
    tokens: Annotated[int, typer.Option(help="Tokens to evaluate on (held out from training where possible).")] = 20_000,
    device: Device = "auto",
    baseline: Annotated[Path | None, typer.Option(help="A flat run whose metrics.json is shown beside.")] = None,
) -> None:
    """Evaluate a run; writes RUN_DIR/metrics.json and prints a table."""
    from trainer.workflows import run_eval

    _, table = run_eval(run_dir, corpus, str(activations) if activations else None, tokens, device, baseline)
    print(table)


@app.command("encode")
def encode_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A checkpoint directory.")],
    out: Annotated[Path, typer.Option(help="Output .safetensors file.")],
    corpus: Corpus = None,
    activations: Activations = None,
    tokens: Annotated[int | None, typer.Option(
        help="Rows to encode [default: all of an --activations file; 20000 tokens of a corpus].")] = None,
    device: Device = "auto",
) -> None:
    """Sparse codes of every level: level_{i}_indices (-1 = unused) and level_{i}_values, [N, K_i]."""
    from trainer.workflows import run_encode

    info = run_encode(run_dir, corpus, str(activations) if activations else None, tokens, device, out)
    print(f"wrote {info['rows']} rows x {info['levels']} levels to {out}")


@app.command("index")
def index_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A checkpoint directory.")],
    corpus: Corpus = None,
    tokens: Annotated[int, typer.Option(help="Tokens of the corpus to index (rounded up to whole contexts).")] = 100_000,
    db: DbUrl = None,
    name: Annotated[str | None, typer.Option(help="Run name in the database [default: the run directory's name].")] = None,
    replace: Annotated[bool, typer.Option(help="Swap out an existing run of that name atomically.")] = False,
    device: Device = "auto",
) -> None:
    """Index a checkpoint: top contexts, histograms, output tokens, edge statistics, into the database."""
    from trainer.index.pipeline import index_checkpoint
    from trainer.settings import get_settings

    summary = index_checkpoint(run_dir, db_url=_db_url(db), default_db_url=get_settings().resolved_database_url,
                               corpus=corpus, tokens=tokens, name=name, replace=replace, device=device)
    print(f"indexed run {summary.name!r}: {summary.tokens:,} tokens in {summary.contexts:,} contexts")


@app.command("serve")
def serve_cmd(
    db: DbUrl = None,
    host: Annotated[str | None, typer.Option(help="Interface to listen on [default: 127.0.0.1].")] = None,
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    local: Annotated[bool, typer.Option(help="Listen on 127.0.0.1 only; annotation writes need no token.")] = False,
) -> None:
    """Serve the API and the browser UI."""
    from backend.server import serve

    serve(db_url=db, host=host, port=port, local=local)


@app.command("export")
def export_cmd(
    run: Annotated[str, typer.Argument(help="Run name.")],
    level: Annotated[int, typer.Argument(help="Level of the subtree's root (0 = top).")],
    index: Annotated[int, typer.Argument(help="Index of the root feature in its level.")],
    depth: Annotated[int | None, typer.Option(help="Levels of descendants to include [default: all].")] = None,
    examples: Annotated[bool, typer.Option(help="Include top-activating contexts.")] = True,
    out: Annotated[Path | None, typer.Option(help="Output file [default: standard output].")] = None,
    db: DbUrl = None,
) -> None:
    """Export an annotated subtree as the hsae-subtree JSON document (the API's export)."""
    import json

    from backend.export import export_subtree, write_document

    document = export_subtree(run, level, index, depth=depth, include_examples=examples, db_url=db)
    if out is None:
        print(json.dumps(document, ensure_ascii=False, indent=1))
    else:
        write_document(document, out)
        print(f"wrote {out}")


@app.command("import")
def import_cmd(
    file: Annotated[Path, typer.Argument(help="An hsae-subtree JSON document.")],
    db: DbUrl = None,
    run: Annotated[str | None, typer.Option(help="Apply to this run name [default: the matching run].")] = None,
) -> None:
    """Apply a document's annotations to its run (same model, layer, architecture and checkpoint)."""
    from backend.export import import_document

    result = import_document(file, db_url=db, run_name=run)
    print(f"run {result.run!r}: {result.applied} annotations applied, {result.unchanged} unchanged, "
          f"{result.skipped} nodes without one ({result.features} nodes in the document)")


@app.command("demo")
def demo_cmd(
    port: Annotated[int, typer.Option(help="Port to serve on (127.0.0.1, local mode).")] = 8000,
    serve: Annotated[bool, typer.Option(help="Serve when done.")] = True,
) -> None:
    """The offline default end to end: data, train, eval, index into SQLite, serve."""
    from trainer.demo import run_demo

    run_demo(port=port, serve=serve)


@db_app.command("upgrade")
def db_upgrade_cmd(db: DbUrl = None) -> None:
    """Create or migrate the schema to the latest revision."""
    from backend.db.session import db_upgrade

    print(f"database at revision {db_upgrade(_db_url(db))}")


def _user_errors() -> tuple[type[BaseException], ...]:
    from trainer.checkpoint import CheckpointError
    from trainer.config import ConfigError
    from trainer.train import TrainingDiverged

    return (HSAEError, ConfigError, CheckpointError, TrainingDiverged)


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit status 2, never a traceback."""
    try:
        app(standalone_mode=False)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        print("interrupted: nothing half-written was kept", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        if isinstance(err, _user_errors()):
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
