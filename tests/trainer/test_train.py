"""The training loop: schedule, logging, checkpoints, exact resume, and stopping on NaN."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.trainer.helpers import D_IN, MODEL_INFO, tiny_arch_config, tiny_train_config
from trainer.checkpoint import load_checkpoint
from trainer.config import ConfigError
from trainer.data import TensorSource
from trainer.models import LevelCode, build_model
from trainer.train import DeadLatentTracker, TrainingDiverged, TrainingError, lr_factor, train


class DyingSource(TensorSource):
    """Raises (as a killed process would stop) when asked for training batch number `die_at`."""

    def __init__(self, rows, die_at: int):
        super().__init__(rows)
        self.die_at = die_at

    def batches(self, batch_size, *, seed, start_step=0):
        batches = super().batches(batch_size, seed=seed, start_step=start_step)
        for step, batch in enumerate(batches, start_step):
            if step == self.die_at and seed == 0:  # not in the normalisation sample, drawn with its own seed
                raise KeyboardInterrupt("killed")
            yield batch


class PoisonedSource(TensorSource):
    """Training batch number `nan_at` is NaN."""

    def __init__(self, rows, nan_at: int):
        super().__init__(rows)
        self.nan_at = nan_at

    def batches(self, batch_size, *, seed, start_step=0):
        batches = super().batches(batch_size, seed=seed, start_step=start_step)
        for step, batch in enumerate(batches, start_step):
            yield torch.full_like(batch, float("nan")) if step == self.nan_at and seed == 0 else batch


def _fresh(arch, **overrides):
    return build_model(tiny_arch_config(arch, **overrides), D_IN, seed=0)


def _train(model, source, run_dir, resume=False, **cfg):
    return train(model, source, tiny_train_config(**cfg), run_dir, model_info=MODEL_INFO, resume=resume)


def _files(run_dir):
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def _logged_steps(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def test_lr_schedule_warms_up_then_decays_by_cosine():
    factors = [lr_factor(s, total=100, warmup=10, min_ratio=0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(factors[:10], factors[1:10]))
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[55] == pytest.approx(0.1 + 0.9 * 0.5, abs=0.02)
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)


def test_dead_latent_tracker_counts_tokens_since_firing():
    tracker = DeadLatentTracker([4], window=10, device=torch.device("cpu"))
    code = LevelCode(torch.tensor([[0, -1], [2, -1]]), torch.tensor([[1.0, 0.0], [2.0, 0.0]]))
    for _ in range(5):
        tracker.update([code])
    assert tracker.dead_masks()[0].tolist() == [False, True, False, True]
    other = DeadLatentTracker([4], window=10, device=torch.device("cpu"))
    other.load_state_dict(tracker.state_dict())
    assert torch.equal(other.since_fired[0], torch.tensor([0, 10, 0, 10]))


def test_training_writes_a_checkpoint_and_a_log(arch, source, tmp_path):
    info = {"rows": 2048}
    run = tmp_path / "run"
    result = train(_fresh(arch), source, tiny_train_config(), run, model_info=MODEL_INFO, data_info=info)
    assert result.step == 12 and result.tokens == 12 * 64
    for key in ("loss", "explained_variance", "l0_0", "dead_0", "tokens_per_s", "lr"):
        assert key in result.logs
    _, cfg = load_checkpoint(tmp_path / "run")
    assert cfg["training"]["step"] == 12 and cfg["training"]["finished"] and cfg["data"] == {"rows": 2048}
    assert cfg["training"]["batch_size"] == 64 and cfg["model"] == MODEL_INFO
    assert _logged_steps(tmp_path / "run") == [4, 8, 12]
    with pytest.raises(ConfigError, match="already holds a checkpoint"):
        _train(_fresh(arch), source, tmp_path / "run")


def test_a_killed_run_resumes_exactly(arch, rows, source, tmp_path):
    whole = _fresh(arch)
    _train(whole, source, tmp_path / "whole")

    with pytest.raises(KeyboardInterrupt):
        _train(_fresh(arch), DyingSource(rows, die_at=8), tmp_path / "killed")
    assert load_checkpoint(tmp_path / "killed")[1]["training"]["step"] == 5
    resumed = _fresh(arch)
    result = _train(resumed, source, tmp_path / "killed", resume=True)
    assert result.resumed_from == 5
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name  # bitwise: weights, optimizer-driven updates, RNG, dead-latent state
    assert _logged_steps(tmp_path / "killed") == [4, 8, 12]


@pytest.mark.parametrize("arch", ["moe", "tree"])
def test_a_killed_run_resumes_exactly_with_checkpoints_written_in_the_background(
    arch, rows, source, tmp_path, monkeypatch
):
    """The writer thread (on by default on CUDA only) writes from snapshots: what it saves is what a run
    writing in the loop saves, and a run killed while it writes resumes bit for bit."""
    whole = _fresh(arch)
    _train(whole, source, tmp_path / "whole")
    monkeypatch.setattr("trainer.train.BACKGROUND_WRITES", True)
    background = _fresh(arch)
    _train(background, source, tmp_path / "background")
    saved = [load_checkpoint(tmp_path / run)[0].state_dict() for run in ("whole", "background")]
    for (name, a), b in zip(saved[0].items(), saved[1].values()):
        assert torch.equal(a, b), name
    with pytest.raises(KeyboardInterrupt):
        _train(_fresh(arch), DyingSource(rows, die_at=8), tmp_path / "killed")
    assert load_checkpoint(tmp_path / "killed")[1]["training"]["step"] == 5
    resumed = _fresh(arch)
    _train(resumed, source, tmp_path / "killed", resume=True)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert _logged_steps(tmp_path / "killed") == [4, 8, 12]


def test_resume_refuses_a_different_run_and_can_extend_one(source, tmp_path):
    run = tmp_path / "run"
    _train(_fresh("topk"), source, run, steps=5)
    with pytest.raises(ConfigError, match="batch_size=64, not 32"):
        _train(_fresh("topk"), source, run, resume=True, steps=8, batch_size=32)
    with pytest.raises(ConfigError, match="different architecture config"):
        _train(_fresh("topk", width=64), source, run, resume=True, steps=8)
    longer = _train(_fresh("topk"), source, run, resume=True, steps=8)
    assert longer.resumed_from == 5 and load_checkpoint(run)[1]["training"]["step"] == 8


def test_a_batch_larger_than_the_data_is_refused_before_anything_is_written(arch, rows, source, tmp_path):
    few = TensorSource(rows[:40])
    with pytest.raises(ConfigError, match="batch size 64 exceeds the 40 rows of activations"):
        _train(_fresh(arch), few, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    run = tmp_path / "run"
    _train(_fresh(arch), source, run, steps=5)
    before = _files(run)
    with pytest.raises(ConfigError, match="exceeds the 40 rows"):
        _train(_fresh(arch), few, run, resume=True, steps=8)
    assert _files(run) == before


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(arch, rows, tmp_path):
    message = r"loss became nan at step 7; .* last good checkpoint \(step 5\)"
    with pytest.raises(TrainingDiverged, match=message):
        _train(_fresh(arch), PoisonedSource(rows, nan_at=7), tmp_path / "run")
    model, cfg = load_checkpoint(tmp_path / "run")
    assert cfg["training"]["step"] == 5
    assert all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())


def test_nan_before_any_checkpoint_says_so(rows, tmp_path):
    with pytest.raises(TrainingDiverged, match="no checkpoint had been written yet"):
        _train(_fresh("topk"), PoisonedSource(rows, nan_at=1), tmp_path / "run")
    assert not (tmp_path / "run" / "cfg.json").exists()


def test_non_finite_activations_are_refused_before_training(rows, tmp_path):
    bad = rows.copy()
    bad[3, 5] = np.inf
    with pytest.raises(TrainingError, match="activations contain NaN or inf"):
        _train(_fresh("tree"), TensorSource(bad), tmp_path / "run")


def test_width_mismatch_is_a_config_error(tmp_path):
    source = TensorSource(np.zeros((128, D_IN + 1), dtype=np.float32))
    with pytest.raises(ConfigError, match="width 33 but the model was built for d_in=32"):
        _train(_fresh("topk"), source, tmp_path / "run")


def test_tree_makes_its_first_tree_during_training(source, tmp_path):
    model = _fresh("tree", reassign_every=None)
    assert model.edges() == []  # no tree over random encoders
    _train(model, source, tmp_path / "run", steps=30)
    assert model.reassign_every == 3  # a tenth of a short run (the paper's 5000 steps otherwise)
    assert len(model.edges()) == (24 - 4) + (48 - 9)  # all but the least similar 20% of each level


def test_bfloat16_autocast_trains(arch, source, tmp_path):
    """The mixed-precision path a GPU run takes (bf16 compute, float32 weights) also runs on the CPU."""
    result = _train(_fresh(arch), source, tmp_path / "r", steps=4, checkpoint_every=0, dtype="bfloat16")
    assert np.isfinite(result.logs["loss"])
    assert all(p.dtype == torch.float32 for p in load_checkpoint(tmp_path / "r")[0].parameters())


def test_training_reduces_the_loss(arch, source, tmp_path):
    result = _train(_fresh(arch), source, tmp_path / "r", steps=60, checkpoint_every=0, log_every=10)
    assert result.history[-1]["explained_variance"] > result.history[0]["explained_variance"] + 0.05


def _with_outliers(rows: np.ndarray, every: int = 37, factor: float = 200.0) -> tuple[np.ndarray, np.ndarray]:
    """A copy of `rows` with every `every`-th row blown up to a massive activation, and the mask of those."""
    rows = rows.copy()
    massive = np.arange(len(rows)) % every == 0
    rows[massive] *= factor
    return rows, massive


def test_training_never_shows_the_model_a_massive_activation(rows, tmp_path):
    data, massive = _with_outliers(rows)
    model = _fresh("topk")
    seen = []
    real_loss = model.loss

    def spy(x_BD, step, dead=None):
        seen.append(x_BD.detach().norm(dim=-1))
        return real_loss(x_BD, step, dead)

    model.loss = spy
    result = _train(model, TensorSource(data), tmp_path / "run")
    norms = torch.cat(seen)
    clean_max = float(np.linalg.norm(rows, axis=1).max())
    assert float(norms.max()) <= clean_max * 1.0001  # no blown-up row reached the loss
    expected_batches = 12 * 64 * (1 - massive.mean())  # the rest did: about 1/37 of each batch is dropped
    assert abs(len(norms) - expected_batches) < 0.1 * expected_batches
    threshold = load_checkpoint(result.run_dir)[1]["training"]["max_norm"]
    median = float(np.median(np.linalg.norm(data, axis=1)))
    assert threshold == pytest.approx(10 * median, rel=0.05)  # from the sample's median, not the data's


def test_max_norm_multiple_none_trains_on_every_row(rows, tmp_path):
    data, _ = _with_outliers(rows)
    model = _fresh("topk")
    sizes = []
    real_loss = model.loss
    model.loss = lambda x_BD, step, dead=None: sizes.append(len(x_BD)) or real_loss(x_BD, step, dead)
    result = _train(model, TensorSource(data), tmp_path / "run", max_norm_multiple=None)
    assert sizes == [64] * 12
    assert load_checkpoint(result.run_dir)[1]["training"]["max_norm"] is None


def test_a_killed_run_with_massive_activations_resumes_exactly(arch, rows, tmp_path):
    data, _ = _with_outliers(rows)
    whole = _fresh(arch)
    _train(whole, TensorSource(data), tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        _train(_fresh(arch), DyingSource(data, die_at=8), tmp_path / "killed")
    resumed = _fresh(arch)
    _train(resumed, TensorSource(data), tmp_path / "killed", resume=True)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
