"""Tree HSAE with JumpReLU levels: the activation and its straight-through gradients, the adaptive λ, and a
jumprelu tree through training, checkpoint, sae-lens export, encode and eval."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.trainer.helpers import D_IN, MODEL_INFO, tiny_arch_config, tiny_train_config
from tests.trainer.test_train import DyingSource
from trainer.checkpoint import load_checkpoint
from trainer.config import ArchConfig, ConfigError
from trainer.evaluate import evaluate
from trainer.models import build_model
from trainer.models.base import LevelCode, pad_codes
from trainer.models.jumprelu import JumpReLULevel
from trainer.train import train

JUMPRELU = dict(activation="jumprelu", target_l0=[3.0, 3.0, 4.0])


def _fresh(**overrides):
    return build_model(tiny_arch_config("tree", **{**JUMPRELU, **overrides}), D_IN, seed=0)


def _level_l0(model, x):
    model.eval()
    return [float(code.l0()) for code in model.encode(x)]


def test_jumprelu_and_its_straight_through_gradients_match_a_hand_computed_case():
    level = JumpReLULevel(d_in=2, width=3, target_l0=1, bandwidth=0.2)
    with torch.no_grad():
        level.threshold_F.copy_(torch.tensor([0.5, 0.4, 0.5]))
    pre = torch.tensor([[0.3, 1.0, -0.2], [0.55, 0.45, 2.0]], requires_grad=True)
    # z = pre·H(pre − θ)
    z = level.activations(pre)
    assert torch.equal(z, torch.tensor([[0.0, 1.0, 0.0], [0.55, 0.45, 2.0]]))
    upstream = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    (z * upstream).sum().backward()
    # ∂/∂pre = H(pre − θ)·upstream (no estimator into the encoder, DeepMind's variant)
    assert torch.equal(pre.grad, torch.tensor([[0.0, 2.0, 0.0], [4.0, 5.0, 6.0]]))
    # ∂/∂θ_i = −Σ_b (θ_i/ε)·1[|pre − θ_i| < ε/2]·upstream: in the window only (1, 0) (0.55 vs 0.5) and
    # (1, 1) (0.45 vs 0.4): −(0.5/0.2)·4 = −10, −(0.4/0.2)·5 = −10, and nothing for latent 2
    torch.testing.assert_close(level.threshold_F.grad, torch.tensor([-10.0, -10.0, 0.0]))

    level.threshold_F.grad = None
    pre.grad = None
    penalty = level.l0_penalty(pre)  # mean over tokens of the number of active latents
    assert float(penalty) == pytest.approx((1 + 3) / 2)
    penalty.backward()
    # ∂/∂θ_i = −(1/ε)·(tokens in the window)/B: −5·1/2 for latents 0 and 1
    torch.testing.assert_close(level.threshold_F.grad, torch.tensor([-2.5, -2.5, 0.0]))
    assert pre.grad is None or not bool(pre.grad.any())


def test_a_jumprelu_code_is_the_dense_activation_in_sparse_slots():
    level = JumpReLULevel(d_in=D_IN, width=40, target_l0=5, bandwidth=0.05)
    x = torch.randn(300, D_IN) * 2
    level.fit_thresholds(x)
    values, indices, pre = level.encode(x)
    dense = torch.zeros(300, 40).scatter_add(1, indices.clamp(min=0), torch.where(indices >= 0, values, 0))
    torch.testing.assert_close(dense, pre * (pre > level.threshold_F))
    assert bool((values[indices >= 0] > 0).all()) and bool((values[indices < 0] == 0).all())
    assert values.shape[1] == int((pre > level.threshold_F).sum(-1).max())  # as many slots as needed
    # thresholds from data: each latent fires on about target/width of the tokens, so L0 starts at the target
    assert float((indices >= 0).sum(-1).float().mean()) == pytest.approx(5, rel=0.1)


def test_the_controller_raises_lambda_above_the_target_and_lowers_it_below():
    level = JumpReLULevel(d_in=4, width=8, target_l0=2, bandwidth=0.05)
    for _ in range(10):
        level.adapt_lambda(torch.tensor(6.0), rate=0.1, ema=0.5)
    # a bias-corrected average: exactly 6 from the first step, so λ = 10·0.1·(6 − 2)
    assert float(level.l0_lambda) == pytest.approx(4.0)
    for _ in range(100):
        level.adapt_lambda(torch.tensor(1.0), rate=0.1, ema=0.5)
    # below the target λ keeps falling, through 0: a negative λ rewards firing, so the steering goes both ways
    assert float(level.l0_lambda) < -5


@pytest.mark.slow  # 500 training steps: about 15 s on an idle core, 40 s on the shared 2-core machine
def test_adaptive_lambda_steers_every_level_to_its_target_l0(rows, source, tmp_path):
    model = _fresh(lambda_rate=0.02, child_init_at=[])
    x = torch.from_numpy(rows)
    model.prepare(x[:512])
    with torch.no_grad():  # start far from the targets: thresholds half what the data init gave
        for sae in model.saes:
            sae.threshold_F.mul_(0.5)
    before = _level_l0(model, x)
    assert all(l0 > 1.4 * target for l0, target in zip(before, JUMPRELU["target_l0"]))
    model.prepare = lambda sample: None  # keep the bad start (train would redo the data init)
    train(model, source, tiny_train_config(steps=500, checkpoint_every=0, log_every=100), tmp_path / "run",
          model_info=MODEL_INFO)
    after = _level_l0(model, x)
    for target, l0 in zip(JUMPRELU["target_l0"], after):
        assert l0 == pytest.approx(target, rel=0.2), (before, after)
    assert all(float(sae.l0_lambda) > 0 for sae in model.saes)


def test_a_jumprelu_tree_trains_resumes_saves_loads_encodes_and_evaluates(rows, source, tmp_path):
    whole = _fresh()
    train(whole, source, tiny_train_config(), tmp_path / "whole", model_info=MODEL_INFO)
    with pytest.raises(KeyboardInterrupt):
        train(_fresh(), DyingSource(rows, die_at=8), tiny_train_config(), tmp_path / "killed",
              model_info=MODEL_INFO)
    resumed = _fresh()
    train(resumed, source, tiny_train_config(), tmp_path / "killed", model_info=MODEL_INFO, resume=True)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name  # thresholds and the controller's λ and average included

    loaded, cfg = load_checkpoint(tmp_path / "whole")
    assert cfg["arch_config"]["activation"] == "jumprelu" and cfg["arch_config"]["target_l0"] == [3, 3, 4]
    assert [lv["target_l0"] for lv in cfg["levels"]] == [3, 3, 4]
    assert all(lv["activation"] == "jumprelu" and lv["k"] is None for lv in cfg["levels"])
    x = torch.from_numpy(rows[:700])
    whole.eval()
    for mine, theirs in zip(whole.encode(x), loaded.encode(x)):
        assert torch.equal(mine.indices, theirs.indices) and torch.equal(mine.values, theirs.values)
    assert float(loaded.saes[0].l0_lambda) == float(whole.saes[0].l0_lambda)

    metrics = evaluate(loaded, [x[:350], x[350:]])  # two batches whose codes have different K
    codes = loaded.encode(x)
    for level, code in enumerate(codes):
        assert metrics["levels"][level]["l0"] == pytest.approx(float((code.values > 0).sum()) / len(x))
    assert metrics["hierarchy"]  # the hierarchy statistics run on variable-width codes

    from sae_lens import SAE  # slow to import: only here

    for level in range(3):
        sae = SAE.load_from_disk(tmp_path / "whole" / "saelens" / f"level_{level}")
        assert json.loads((tmp_path / "whole" / "saelens" / f"level_{level}" / "cfg.json").read_text())[
            "architecture"] == "jumprelu"
        feats = sae.encode(x)
        dense = torch.zeros_like(feats).scatter_add(1, codes[level].indices.clamp(min=0), codes[level].values)
        torch.testing.assert_close(feats, dense, atol=1e-4, rtol=1e-4)


def test_codes_of_batches_with_different_widths_join_padded():
    a = LevelCode(torch.tensor([[3, -1]]), torch.tensor([[0.5, 0.0]]))
    b = LevelCode(torch.tensor([[1, 2, 0]]), torch.tensor([[0.1, 0.2, 0.3]]))
    joined = pad_codes([a, b])
    assert torch.equal(joined.indices, torch.tensor([[3, -1, -1], [1, 2, 0]]))
    assert torch.equal(joined.values, torch.tensor([[0.5, 0.0, 0.0], [0.1, 0.2, 0.3]]))


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(arch="tree", activation="relu"), "activation must be topk or jumprelu"),
        (dict(arch="tree", levels=[4, 8], activation="jumprelu", target_l0=[2.0]), "target_l0 has 1 entries"),
        (dict(arch="tree", levels=[4, 8], activation="jumprelu", target_l0=[2.0, 9.0]), r"at most its level"),
        (dict(arch="tree", levels=[4, 8], target_l0=[2.0, 2.0]), "only to activation 'jumprelu'"),
        (dict(arch="moe", activation="jumprelu"), "only to 'tree'"),
        (dict(arch="tree", activation="jumprelu", bandwidth=0), "bandwidth must be > 0"),
    ],
)
def test_bad_jumprelu_fields_are_refused(fields, message):
    with pytest.raises(ConfigError, match=message):
        ArchConfig(**fields)


def test_jumprelu_target_defaults_to_each_levels_k():
    cfg = ArchConfig(arch="tree", levels=[8, 16], level_k=[2, 5], activation="jumprelu")
    assert cfg.target_l0 == [2.0, 5.0]
    assert ArchConfig.from_dict(cfg.to_dict()) == cfg


def test_encode_and_index_join_chunks_whose_codes_differ_in_width(rows, source, tmp_path, monkeypatch):
    from safetensors.numpy import load_file

    from trainer.index import pipeline
    from trainer.workflows import run_encode

    model = _fresh()
    train(model, source, tiny_train_config(steps=5), tmp_path / "run", model_info=MODEL_INFO)
    model.eval()
    many = np.concatenate([rows, rows * 1.5, rows])  # 6144 rows: two chunks of `hsae encode`
    np.save(tmp_path / "acts.npy", many)
    out = tmp_path / "codes.safetensors"
    run_encode(tmp_path / "run", None, str(tmp_path / "acts.npy"), None, "cpu", out)
    written = load_file(out)
    monkeypatch.setattr(pipeline, "ENCODE_ROWS", 1000)
    indexed, _ = pipeline._encode(model, many, torch.device("cpu"), float("inf"))
    x = torch.from_numpy(many)
    for level, code in enumerate(model.encode(x)):
        dense = torch.zeros(len(x), 48).scatter_add(1, code.indices.clamp(min=0), code.values)
        for indices, values in [(written[f"level_{level}_indices"], written[f"level_{level}_values"]),
                                indexed[level]]:
            assert indices.shape[1] == code.indices.shape[1]  # the widest chunk's K
            got = torch.zeros(len(x), 48).scatter_add(
                1, torch.from_numpy(indices).clamp(min=0), torch.from_numpy(values).float()
            )
            torch.testing.assert_close(got, dense)
