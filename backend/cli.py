"""`hsae`: the command line (docs/contracts.md#contract-1-command-line). It composes the trainer's commands
(train, eval, encode: trainer/cli.py) with those that need the database or the server (index, serve, export,
import, demo, db). It lives in the backend because dependencies run one way: the backend uses the trainer,
never the reverse. Commands stay thin: they parse, then call the library."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from trainer import cli as trainer_cli
from trainer.cli import Corpus, Device

app = typer.Typer(
    help="Train, evaluate, index and explore hierarchical sparse autoencoders.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_app = typer.Typer(help="Database schema (owned by Alembic migrations).", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.registered_commands.extend(trainer_cli.app.registered_commands)

DbUrl = Annotated[
    str | None,
    typer.Option("--db", help="SQLAlchemy URL [default: $HSAE_DATABASE_URL or SQLite under the data dir]."),
]


def _db_url(db: str | None) -> str:
    from backend.settings import get_settings

    return db or get_settings().resolved_database_url


@app.command("index")
def index_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A checkpoint directory.")],
    corpus: Corpus = None,
    tokens: Annotated[
        int, typer.Option(help="Tokens of the corpus to index (rounded up to whole contexts).")
    ] = 100_000,
    db: DbUrl = None,
    name: Annotated[
        str | None, typer.Option(help="Run name in the database [default: the run directory's name].")
    ] = None,
    replace: Annotated[bool, typer.Option(help="Swap out an existing run of that name atomically.")] = False,
    device: Device = "auto",
) -> None:
    """Index a checkpoint: top contexts, histograms, output tokens, edge statistics, into the database."""
    from backend.index.pipeline import index_checkpoint
    from backend.settings import get_settings

    summary = index_checkpoint(
        run_dir, db_url=_db_url(db), default_db_url=get_settings().resolved_database_url,
        corpus=corpus, tokens=tokens, name=name, replace=replace, device=device,
    )
    if summary.run_id < 0:
        return  # a rank other than 0 under torchrun: rank 0 speaks for the run
    print(f"indexed run {summary.name!r}: {summary.tokens:,} tokens in {summary.contexts:,} contexts "
          f"in {summary.seconds:.0f} s ({summary.tokens / summary.seconds:,.0f} tokens/s; database writes "
          f"{summary.write_seconds:.0f} s, {100 * summary.write_seconds / summary.seconds:.0f}%)")


@app.command("index-sae")
def index_sae_cmd(
    sae_dirs: Annotated[list[Path], typer.Argument(
        help="Folders of SAEs saved by sae-lens (cfg.json + sae_weights.safetensors): several of rising "
             "width become levels, one Matryoshka SAE its groups, one plain SAE a flat forest.")],
    name: Annotated[str, typer.Option(help="Run name in the database.")],
    model: Annotated[str | None, typer.Option(
        help="Hugging Face causal LM name or local path [default: the SAE cfg's model_name, else the bundled "
             "SmolLM2-135M].")] = None,
    layer: Annotated[int | None, typer.Option(
        help="Block whose residual-stream output the SAEs read [default: from the cfg's hook_name].")] = None,
    corpus: Annotated[
        str | None, typer.Option(help="demo, a .txt file, a folder, a .jsonl (text field) or hf:NAME[:split] "
                                      "[default: demo].")
    ] = None,
    tokens: Annotated[
        int, typer.Option(help="Tokens of the corpus to index (rounded up to whole contexts).")
    ] = 100_000,
    unassigned: Annotated[float, typer.Option(
        help="Fraction of each wider level's features, those of lowest P(parent | child), left without a "
             "parent.")] = 0.2,
    db: DbUrl = None,
    replace: Annotated[bool, typer.Option(help="Swap out an existing run of that name atomically.")] = False,
    device: Device = "auto",
) -> None:
    """Index your own sae-lens SAEs as one browsable forest, with parents inferred from co-firing."""
    from backend.index.pipeline import index_sae_folders
    from backend.settings import get_settings

    summary = index_sae_folders(
        sae_dirs, db_url=_db_url(db), default_db_url=get_settings().resolved_database_url, name=name,
        model=model, layer=layer, corpus=corpus, tokens=tokens, unassigned_fraction=unassigned,
        replace=replace, device=device,
    )
    print(f"indexed run {summary.name!r}: {summary.tokens:,} tokens in {summary.contexts:,} contexts")


@app.command("serve")
def serve_cmd(
    db: DbUrl = None,
    host: Annotated[str | None, typer.Option(help="Interface to listen on [default: 127.0.0.1].")] = None,
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    local: Annotated[
        bool, typer.Option(help="Listen on 127.0.0.1 only; annotation writes need no token.")
    ] = False,
    live_preload: Annotated[
        str | None,
        typer.Option(help="Load these runs' live models before serving (names, comma-separated; * for the "
                     "newest) [default: $HSAE_LIVE_PRELOAD, else on the first prompt]."),
    ] = None,
) -> None:
    """Serve the API and the browser UI."""
    from backend.server import serve

    serve(db_url=db, host=host, port=port, local=local, live_preload=live_preload)


@app.command("export")
def export_cmd(
    run: Annotated[str, typer.Argument(help="Run name.")],
    level: Annotated[int, typer.Argument(help="Level of the subtree's root (0 = top).")],
    index: Annotated[int, typer.Argument(help="Index of the root feature in its level.")],
    depth: Annotated[
        int | None, typer.Option(help="Levels of descendants to include [default: all].")
    ] = None,
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
    run: Annotated[
        str | None, typer.Option(help="Apply to this run name [default: the matching run].")
    ] = None,
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
    from backend.demo import run_demo

    run_demo(port=port, serve=serve)


@db_app.command("upgrade")
def db_upgrade_cmd(db: DbUrl = None) -> None:
    """Create or migrate the schema to the latest revision."""
    from backend.db.session import db_upgrade

    print(f"database at revision {db_upgrade(_db_url(db))}")


def main() -> None:
    """Console entry point (`hsae`)."""
    trainer_cli.run(app)


if __name__ == "__main__":
    main()
