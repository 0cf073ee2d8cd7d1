"""Contract 2: the checkpoint round-trips, refuses what is not ours, and exports sae-lens levels."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.trainer.helpers import D_IN, MODEL_INFO
from trainer import checkpoint
from trainer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def _save(model, run_dir, step=7):
    info = {"source": "test"}
    return save_checkpoint(run_dir, model, model_info=MODEL_INFO, training={"step": step}, data_info=info)


def test_round_trip_encodes_identically(prepared, rows, tmp_path):
    _save(prepared, tmp_path / "run")
    loaded, cfg = load_checkpoint(tmp_path / "run")
    x = torch.from_numpy(rows[:200])
    for mine, theirs in zip(prepared.encode(x), loaded.encode(x)):
        assert torch.equal(mine.indices, theirs.indices) and torch.equal(mine.values, theirs.values)
    assert cfg["format"] == "hsae-checkpoint" and cfg["version"] == 1 and cfg["arch"] == prepared.arch
    assert cfg["d_in"] == D_IN and [lv["width"] for lv in cfg["levels"]] == prepared.level_widths
    assert cfg["model"] == MODEL_INFO and cfg["training"]["step"] == 7 and cfg["data"] == {"source": "test"}
    assert cfg["normalization"]["kind"] == prepared.normalization


def test_layout_and_hierarchy_file(prepared, tmp_path):
    run = _save(prepared, tmp_path / "run")
    names = {p.name for p in run.iterdir()}
    assert {"cfg.json", "weights.safetensors", "hierarchy.json"} <= names
    hierarchy = json.loads((run / "hierarchy.json").read_text())
    assert [(tuple(e["parent"]), tuple(e["child"])) for e in hierarchy["edges"]] == prepared.edges()
    levels = sorted(p.name for p in (run / "saelens").iterdir()) if (run / "saelens").exists() else []
    expected = {"topk": ["level_0"], "tree": ["level_0", "level_1", "level_2"], "moe": []}[prepared.arch]
    assert levels == expected


@pytest.mark.parametrize("arch", ["topk", "tree"])  # moe's levels are not ordinary SAEs
def test_saelens_export_loads_and_encodes_like_us(prepared, rows, tmp_path):
    from sae_lens import SAE  # slow to import: only here

    run = _save(prepared, tmp_path / "run")
    x = torch.from_numpy(rows[:300])
    ours = prepared.encode(x)
    for level in range(len(prepared.level_widths)):
        sae = SAE.load_from_disk(run / "saelens" / f"level_{level}")
        assert sae.cfg.metadata.hook_name == MODEL_INFO["hook"]
        feats = sae.encode(x)
        dense = torch.zeros_like(feats).scatter_add(1, ours[level].indices.clamp(min=0), ours[level].values)
        torch.testing.assert_close(feats, dense, atol=1e-4, rtol=1e-4)
        ours_raw = prepared.decode(ours, level) / prepared.input_scale
        torch.testing.assert_close(sae.decode(feats), ours_raw, atol=1e-4, rtol=1e-4)


def test_missing_foreign_damaged_and_newer_directories_are_refused(prepared, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not an HSAE checkpoint: it has no cfg.json"):
        load_checkpoint(tmp_path / "empty")

    run = _save(prepared, tmp_path / "run")
    if prepared.arch != "moe":
        with pytest.raises(CheckpointError, match="looks like a sae-lens SAE"):
            load_checkpoint(run / "saelens" / "level_0")

    cfg = json.loads((run / "cfg.json").read_text())
    (run / "cfg.json").write_text(json.dumps({**cfg, "version": 2}))
    with pytest.raises(CheckpointError, match=r"newer hsae-forest \(checkpoint version 2"):
        load_checkpoint(run)
    (run / "cfg.json").write_text(json.dumps({**cfg, "format": "something-else"}))
    with pytest.raises(CheckpointError, match="not an HSAE checkpoint"):
        load_checkpoint(run)
    (run / "cfg.json").write_text(json.dumps(cfg)[:40])
    with pytest.raises(CheckpointError, match="cfg.json is not valid JSON"):
        load_checkpoint(run)
    (run / "cfg.json").write_text(json.dumps(cfg))

    weights = (run / "weights.safetensors").read_bytes()
    (run / "weights.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError, match="cannot read weights.safetensors") as info:
        load_checkpoint(run)
    assert "\n" not in str(info.value)
    (run / "weights.safetensors").unlink()
    with pytest.raises(CheckpointError, match="weights.safetensors is missing"):
        load_checkpoint(run)


def test_weights_that_do_not_fit_the_config_are_refused(prepared, tmp_path):
    run = _save(prepared, tmp_path / "run")
    cfg = json.loads((run / "cfg.json").read_text())
    arch_cfg = cfg["arch_config"]
    if prepared.arch == "tree":
        arch_cfg["levels"] = [w * 2 for w in arch_cfg["levels"]]
    else:
        arch_cfg["width"] *= 2
    (run / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="weights do not fit the config"):
        load_checkpoint(run)


def test_a_save_is_atomic_and_carries_other_files(prepared, tmp_path, monkeypatch):
    run = _save(prepared, tmp_path / "run", step=1)
    (run / "notes.txt").write_text("mine")
    (run / "metrics.json").write_text("{}")
    real_rename = os.rename
    calls = []

    def dying_rename(src, dst):  # the process dies after moving the old checkpoint aside
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", dying_rename)
    with pytest.raises(KeyboardInterrupt):
        _save(prepared, run, step=2)
    monkeypatch.setattr(checkpoint.os, "rename", real_rename)
    assert not run.exists()  # torn in the middle of the swap ...
    _, cfg = load_checkpoint(run)  # ... and the next reader puts the previous checkpoint back
    assert cfg["training"]["step"] == 1 and (run / "notes.txt").read_text() == "mine"

    _save(prepared, run, step=3)
    _, cfg = load_checkpoint(run)
    assert cfg["training"]["step"] == 3
    assert (run / "notes.txt").read_text() == "mine" and not (run / "metrics.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporaries left behind


def test_metrics_and_hierarchy_stats_are_written_into_a_checkpoint(prepared, tmp_path):
    run = _save(prepared, tmp_path / "run")
    checkpoint.write_metrics(run, {"explained_variance": 0.5})
    assert json.loads((run / "metrics.json").read_text()) == {"explained_variance": 0.5}
    stats = [{"coactive": i} for i in range(len(prepared.edges()))]
    checkpoint.write_hierarchy(run, prepared, stats)
    edges = json.loads((run / "hierarchy.json").read_text())["edges"]
    assert [e["coactive"] for e in edges] == list(range(len(stats)))
    with pytest.raises(CheckpointError):
        checkpoint.write_metrics(tmp_path, {})
