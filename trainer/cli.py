"""The trainer's commands of `hsae` (docs/contracts.md#contract-1-command-line): train, eval, encode.

Commands stay thin: they parse, then call the library. `hsae` itself (backend/cli.py) mounts these next to the
commands that need the database or the server (index, serve, export, import, demo, db), so that the trainer
never imports the backend; `python -m trainer.cli` runs the trainer's commands alone."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import click
import typer

from trainer.errors import HSAEError

app = typer.Typer(
    help="Train, evaluate and encode with hierarchical sparse autoencoders.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

Model = Annotated[
    str | None,
    typer.Option(help="Hugging Face causal LM name or local path [default: bundled SmolLM2-135M]."),
]
Layer = Annotated[
    int | None, typer.Option(help="Block whose residual-stream output is captured [default: 15].")
]
Corpus = Annotated[
    str | None, typer.Option(help="demo, a .txt file, a folder, a .jsonl (text field) or hf:NAME[:split].")
]
Activations = Annotated[
    Path | None, typer.Option(help="A float [N, d] matrix (.npy, or .safetensors tensor 'activations').")
]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda.")]


@app.command("train")
def train_cmd(
    arch: Annotated[str | None, typer.Option(help="moe, tree or topk [default: moe].")] = None,
    model: Model = None,
    layer: Layer = None,
    corpus: Corpus = None,
    activations: Activations = None,
    tokens: Annotated[
        int | None,
        typer.Option(help="Tokens of activations to draw from the corpus [default: 200000], or rows to read "
                          "from an --activations file [default: all]."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Run directory [default: data/runs/<arch>-<time>].")
    ] = None,
    device: Device = "auto",
    seed: Annotated[int | None, typer.Option(help="Random seed (initialisation and data order).")] = None,
    config: Annotated[
        Path | None, typer.Option(help='JSON file {"arch": {...}, "train": {...}}; flags override it.')
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            help="project (measured defaults) or paper (each paper's settings) [default: project]."
        ),
    ] = None,
    width: Annotated[int | None, typer.Option(help="Flat width, or the number of parents for moe.")] = None,
    k: Annotated[int | None, typer.Option(help="Active latents per token at the top level.")] = None,
    children: Annotated[int | None, typer.Option(help="moe: children per parent.")] = None,
    subspace: Annotated[int | None, typer.Option(
        help="moe: subspace dimension of each expert (default: children, at most 8; paper preset 4)."
    )] = None,
    levels: Annotated[
        str | None, typer.Option(help="tree: widths top to bottom, e.g. 512,1024,2048.")
    ] = None,
    activation: Annotated[
        str | None,
        typer.Option(help="tree: topk or jumprelu (the paper's, L0 steered to --k per level) "
                          "[default: topk]."),
    ] = None,
    batch: Annotated[int | None, typer.Option(help="Batch size (tokens per step).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    steps: Annotated[
        int | None, typer.Option(help="Optimizer steps [default: one pass over the data].")
    ] = None,
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
        {"width": width, "k": k, "children": children, "subspace": subspace, "levels": level_list,
         "activation": activation},
        {"seed": seed, "batch_size": batch, "lr": lr, "steps": steps, "device": device},
        preset,
    )
    data = DataSpec(
        model=model or DataSpec.model, layer=15 if layer is None else layer, corpus=corpus,
        activations=str(activations) if activations else None,
        tokens=tokens if tokens is not None or activations else DEFAULT_TOKENS, device=device,
    )
    run_dir = run_training(data, run_cfg, out, resume=resume)
    from trainer.distributed import env_world

    if env_world().is_main:  # under torchrun, rank 0 speaks for the run
        print(run_dir)


@app.command("eval")
def eval_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A checkpoint directory.")],
    corpus: Corpus = None,
    activations: Activations = None,
    tokens: Annotated[
        int, typer.Option(help="Tokens to evaluate on (held out from training where possible).")
    ] = 20_000,
    device: Device = "auto",
    baseline: Annotated[
        Path | None, typer.Option(help="A flat run whose metrics.json is shown beside.")
    ] = None,
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


def _user_errors() -> tuple[type[BaseException], ...]:
    from trainer.checkpoint import CheckpointError
    from trainer.config import ConfigError
    from trainer.train import TrainingDiverged

    return (HSAEError, ConfigError, CheckpointError, TrainingDiverged)


def run(cli: typer.Typer) -> None:
    """Run a command line: user errors become one line on stderr and exit status 2, never a traceback."""
    try:
        cli(standalone_mode=False)
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


def main() -> None:
    run(app)


if __name__ == "__main__":
    main()
