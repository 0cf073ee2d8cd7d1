"""Data-parallel training (trainer/distributed.py): 2 gloo ranks under torchrun train the same model as one
process given the same global batch, for each architecture, through the `train` command; a killed 2-rank run
resumes exactly; rank 0 alone writes and prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.trainer.ddp_worker import ARCHES
from tests.trainer.helpers import TINY_ARCHES
from trainer.sources import DataSpec
from trainer.workflows import build_run_config, run_training

REPO = Path(__file__).resolve().parents[2]
STEPS = 8


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    folder = tmp_path_factory.mktemp("ddp")
    rng = np.random.default_rng(0)
    atoms = rng.standard_normal((40, 32)).astype(np.float32)
    picks, mags = rng.integers(0, 40, (1024, 4)), rng.exponential(1, (1024, 4, 1)).astype(np.float32)
    rows = (atoms[picks] * mags).sum(1) + 0.05 * rng.standard_normal((1024, 32)).astype(np.float32)
    rows[::97] *= 50  # massive activations: the outlier filter leaves different counts on the two ranks
    np.save(folder / "acts.npy", rows)
    train = {
        "batch_size": 128,
        "lr": 3e-3,
        "steps": STEPS,
        "checkpoint_every": 4,
        "log_every": 2,
        "dead_window_tokens": 256,
        "dtype": "float32",
        "progress": True,
    }
    for arch in ARCHES:
        (folder / f"{arch}.json").write_text(json.dumps({"arch": TINY_ARCHES[arch], "train": train}))
    # λ follows each step's L0 error at once, so a rank that steered by its own half of the batch would
    # end with another λ than its peer; no re-assignment or child init (rank 0 broadcasts the whole model)
    jumprelu = {
        **TINY_ARCHES["tree"],
        "activation": "jumprelu",
        "lambda_rate": 0.01,
        "lambda_ema": 0.0,
        "reassign_every": 100,
        "child_init_at": [],
    }
    (folder / "tree-jumprelu.json").write_text(json.dumps({"arch": jumprelu, "train": train}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "tests.trainer.ddp_worker",
        str(folder),
    ]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder, done


def _single(folder: Path, arch: str) -> Path:
    run_cfg = build_run_config(folder / f"{arch}.json", None, {}, {})  # as the CLI composes `--config`
    run_cfg.train.device, run_cfg.train.progress = "cpu", False
    out = folder / f"single-{arch}"
    if not out.exists():
        run_training(DataSpec(activations=str(folder / "acts.npy"), tokens=None), run_cfg, out)
    return out


def _assert_same_weights(a: Path, b: Path) -> None:
    """Equal up to float summation order (a batch's sums run in two halves), which Adam's normalised steps can
    carry to ~1e-4 on a weight whose gradient is near 0; training on one rank's half alone moves weights by
    ~1e-2."""
    wa, wb = load_file(a / "weights.safetensors"), load_file(b / "weights.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-3, atol=2e-4, msg=f"{name} differs")
        if wa[name].is_floating_point():
            assert float((wa[name] - wb[name]).abs().mean()) < 1e-5, name


@pytest.mark.parametrize("arch", ARCHES)
def test_two_ranks_train_what_one_process_trains(ddp_runs, arch):
    folder, _ = ddp_runs
    _assert_same_weights(folder / f"ddp-{arch}", _single(folder, arch))
    training = json.loads((folder / f"ddp-{arch}" / "cfg.json").read_text())["training"]
    assert training["world_size"] == 2 and training["step"] == STEPS
    # one writer: each logged step once
    logged = [json.loads(line)["step"] for line in (folder / f"ddp-{arch}" / "train_log.jsonl").open()]
    assert logged == list(range(2, STEPS + 1, 2))


def test_a_killed_two_rank_run_resumes_exactly(ddp_runs):
    folder, _ = ddp_runs
    _assert_same_weights(folder / "ddp-resumed", _single(folder, "tree"))
    logged = [json.loads(line)["step"] for line in (folder / "ddp-resumed" / "train_log.jsonl").open()]
    assert logged == list(range(2, STEPS + 1, 2))


def test_ranks_steer_jumprelu_sparsity_by_the_global_batch(ddp_runs):
    """Each rank's λ (and so its thresholds) is driven by the L0 of the whole global batch, all-reduced: the
    ranks end bit-for-bit equal, where steering by each rank's own half left them apart."""
    folder, _ = ddp_runs
    rank0, rank1 = json.loads((folder / "jumprelu-ranks.json").read_text())
    assert rank0 == rank1
    assert all(lam != 0 for lam in rank0["lambda"])  # the controller moved every level's λ from 0


def test_a_batch_the_ranks_cannot_split_is_refused_on_every_rank(ddp_runs):
    folder, done = ddp_runs
    for rank in (0, 1):
        assert f"rank {rank}: batch size 127 is not divisible by the 2 processes" in done.stderr
    assert not (folder / "odd").exists()


def test_rank_zero_alone_prints_and_shows_progress(ddp_runs):
    folder, done = ddp_runs
    printed = done.stdout.split()
    for arch in ARCHES:
        assert printed.count(str(folder / f"ddp-{arch}")) == 1
    assert printed.count(str(folder / "ddp-resumed")) == 1
    # one bar per run that starts from step 0 (3 runs, the killed one, the JumpReLU one), from rank 0 only
    assert done.stderr.count(f" 0/{STEPS} [") == len(ARCHES) + 2
