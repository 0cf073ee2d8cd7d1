"""Run by tests/trainer/test_distributed.py under torchrun (2 gloo ranks): the `train` command of the CLI
with a batch the ranks cannot split (refused), once per architecture, then a tree run killed at step 6 (on
every rank) and resumed with `train --resume`, then a JumpReLU tree whose sparsity controller state every
rank reports (jumprelu-ranks.json).

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.trainer.ddp_worker DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import typer

from trainer.activations import load_activation_file
from trainer.cli import app
from trainer.config import ConfigError
from trainer.data import TensorSource
from trainer.models import build_model
from trainer.train import train
from trainer.workflows import build_run_config

ARCHES = ("topk", "moe", "tree")
KILL_AT = 6


class DyingSource(TensorSource):
    """Stops (as a killed process would) when the loop asks for training batch KILL_AT."""

    def batch_indices(self, batch_size, *, seed, start_step=0):
        batches = super().batch_indices(batch_size, seed=seed, start_step=start_step)
        for step, idx in enumerate(batches, start_step):
            if step == KILL_AT and seed == 0:  # not the normalisation sample, drawn with its own seed
                raise KeyboardInterrupt("killed")
            yield idx


def main(folder: Path) -> None:
    dist.init_process_group("gloo")  # one group for all the runs below; train() uses it as torchrun's
    cli = typer.main.get_command(app)
    acts = str(folder / "acts.npy")

    def train_cmd(*args: str) -> None:
        cli.main(["train", "--activations", acts, "--device", "cpu", *args], standalone_mode=False)

    try:  # a batch the ranks cannot split: refused on every rank, nothing written
        train_cmd("--config", str(folder / "topk.json"), "--out", str(folder / "odd"), "--batch", "127")
        raise AssertionError("an odd batch was accepted")
    except ConfigError as err:
        print(f"rank {dist.get_rank()}: {err}", file=sys.stderr)
    for arch in ARCHES:
        train_cmd("--config", str(folder / f"{arch}.json"), "--out", str(folder / f"ddp-{arch}"))
    run_cfg = build_run_config(folder / "tree.json", None, {}, {})  # as `--config` composes it
    source = DyingSource(load_activation_file(acts).rows_ND)
    model = build_model(run_cfg.arch, source.d_in, seed=run_cfg.train.seed)
    try:
        train(
            model,
            source,
            run_cfg.train,
            folder / "ddp-resumed",
            model_info={"name": None, "layer": None, "hook": None},
            data_info={"activations": acts, "rows": source.num_rows},
        )
        raise AssertionError("the run was not killed")
    except KeyboardInterrupt:
        pass
    train_cmd("--config", str(folder / "tree.json"), "--out", str(folder / "ddp-resumed"), "--resume")
    _jumprelu_state_on_every_rank(folder, source)
    dist.destroy_process_group()


def _jumprelu_state_on_every_rank(folder: Path, source: TensorSource) -> None:
    run_cfg = build_run_config(folder / "tree-jumprelu.json", None, {}, {})
    model = build_model(run_cfg.arch, source.d_in, seed=run_cfg.train.seed)
    train(
        model,
        TensorSource(source.rows_ND),
        run_cfg.train,
        folder / "ddp-jumprelu",
        model_info={"name": None, "layer": None, "hook": None},
        data_info={"rows": source.num_rows},
    )
    state = torch.cat(
        [
            torch.stack([sae.l0_lambda for sae in model.saes]),
            torch.cat([sae.threshold_F.detach() for sae in model.saes]),
        ]
    ).float()
    gathered = [torch.zeros_like(state) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, state)
    if dist.get_rank() == 0:
        levels = len(model.saes)
        (folder / "jumprelu-ranks.json").write_text(
            json.dumps([{"lambda": g[:levels].tolist(), "threshold": g[levels:].tolist()} for g in gathered])
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
