"""Contract 2: the checkpoint round-trips, refuses what is not ours, and exports sae-lens levels."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.trainer.helpers import D_IN, MODEL_INFO, tiny_arch_config
from trainer import checkpoint
from trainer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from trainer.models import build_model
from trainer.models.tree import fit_floors


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


def test_a_floored_tree_exports_its_floor_and_sae_lens_agrees_above_it(rows, tmp_path):
    """sae-lens's TopK has no floor (`min_activation`): the level exports as plain TopK with the floor in its
    metadata, and sae-lens's code thresholded there is ours."""
    from sae_lens import SAE  # slow to import: only here

    model = build_model(tiny_arch_config("tree", min_activation=0.5), D_IN, seed=0)
    model.prepare(torch.from_numpy(rows[:512]))
    fit_floors(model, model.normalize(torch.from_numpy(rows[:512]))[0])
    run = _save(model, tmp_path / "run")
    x = torch.from_numpy(rows[:300])
    ours = model.encode(x)
    below = 0
    for level in range(len(model.level_widths)):
        sae = SAE.load_from_disk(run / "saelens" / f"level_{level}")
        floor = float(model.saes[level].floor)
        assert floor > 0 and sae.cfg.metadata.hsae_min_activation == floor
        feats = sae.encode(x)
        below += int(((feats > 0) & (feats < floor)).sum())
        dense = torch.zeros_like(feats).scatter_add(1, ours[level].indices.clamp(min=0), ours[level].values)
        torch.testing.assert_close(torch.where(feats >= floor, feats, 0), dense, atol=1e-4, rtol=1e-4)
    assert below > 0  # the floor dropped something, so the comparison above tested it


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

    def failing_rename(src, dst):  # the swap fails after moving the old checkpoint aside
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", failing_rename)
    with pytest.raises(KeyboardInterrupt):
        _save(prepared, run, step=2)
    monkeypatch.setattr(checkpoint.os, "rename", real_rename)
    # the failed save put the previous checkpoint back itself, and removed its temporary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    _, cfg = load_checkpoint(run)
    assert cfg["training"]["step"] == 1 and (run / "notes.txt").read_text() == "mine"

    _save(prepared, run, step=3)
    _, cfg = load_checkpoint(run)
    assert cfg["training"]["step"] == 3
    assert (run / "notes.txt").read_text() == "mine" and not (run / "metrics.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporaries left behind


def _killed_mid_swap(prepared, tmp_path):
    """What a save killed between its two renames leaves (in this container or another): the previous
    checkpoint moved aside, no run directory, and the new checkpoint's temporary."""
    run = _save(prepared, tmp_path / "run", step=1)
    (run / "notes.txt").write_text("mine")
    _save(prepared, tmp_path / ".run.tmp-4194303-0badc0de", step=2)
    os.rename(run, tmp_path / ".run.old-4194303-0badc0de")
    return run


def _snapshot(folder):
    return sorted(
        (str(p.relative_to(folder)), p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.rglob("*")
    )


def test_reading_never_renames_or_deletes(prepared, tmp_path):
    """A reader of a checkpoint whose save was killed mid-swap reads the previous checkpoint where it lies,
    and leaves every file and folder as it found them: the temporaries may belong to a save still under way
    in another container, where a process id says nothing."""
    run = _killed_mid_swap(prepared, tmp_path)
    before = _snapshot(tmp_path)
    assert checkpoint.is_checkpoint(run)
    info = checkpoint.read_info(run)
    assert info.step == 1 and info.run_dir == run and info.metrics is None
    ckpt = checkpoint.open(run)
    assert ckpt.step == 1 and len(ckpt.digest) == 64
    assert load_checkpoint(run)[1]["training"]["step"] == 1
    assert _snapshot(tmp_path) == before


def test_a_save_recovers_only_what_nobody_touched_for_a_while(prepared, tmp_path, monkeypatch):
    run = _killed_mid_swap(prepared, tmp_path)
    # fresh leftovers may be another process's save under way: a save goes ahead beside them
    _save(prepared, run, step=3)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [".run.old-4194303-0badc0de", ".run.tmp-4194303-0badc0de", "run"]
    assert checkpoint.read_info(run).step == 3

    shutil.rmtree(run)
    monkeypatch.setattr(checkpoint, "STALE_AFTER_S", -1.0)  # now they count as abandoned
    assert checkpoint.read_info(run).step == 1  # still read in place ...
    _save(prepared, run, step=4)  # ... and put back (carrying the notes over) by the next save
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert checkpoint.read_info(run).step == 4 and (run / "notes.txt").read_text() == "mine"


def test_open_gives_a_typed_handle(prepared, tmp_path):
    """One reader for every consumer: the model, what it was trained on, its massive-activation threshold
    and its weights digest."""
    data = {"corpus": {"spec": "demo", "fingerprint": "f"}, "context_len": 32, "tokens": 500}
    run = save_checkpoint(tmp_path / "run", prepared, model_info=MODEL_INFO, data_info=data,
                          training={"step": 7, "max_norm": 12.5, "max_norm_multiple": 10.0, "finished": True,
                                    "batch_size": 64, "seed": 3})
    ckpt = checkpoint.open(run)
    assert ckpt.model.level_widths == prepared.level_widths and not ckpt.model.training
    assert ckpt.arch == prepared.arch and ckpt.d_in == D_IN and ckpt.level_widths == prepared.level_widths
    assert ckpt.model_info == checkpoint.ModelInfo(
        MODEL_INFO["name"], MODEL_INFO["layer"], MODEL_INFO["hook"]
    )
    data_info = ckpt.data_info
    assert (data_info.corpus_spec, data_info.context_len, data_info.tokens) == ("demo", 32, 500)
    assert ckpt.data_info.activations is None
    assert (ckpt.step, ckpt.finished, ckpt.batch_size, ckpt.seed) == (7, True, 64, 3)
    assert ckpt.max_norm == 12.5 and ckpt.max_norm_multiple == 10.0
    assert ckpt.digest == hashlib.sha256((run / "weights.safetensors").read_bytes()).hexdigest()
    assert ckpt.metrics is None
    checkpoint.write_metrics(run, {"explained_variance": 0.5})
    assert checkpoint.read_info(run).metrics == {"explained_variance": 0.5}

    plain = save_checkpoint(
        tmp_path / "plain", prepared, model_info={}, training={"step": 1, "max_norm": None}
    )
    info = checkpoint.read_info(plain)
    assert info.max_norm == math.inf and info.model_info == checkpoint.ModelInfo()
    assert info.data_info == checkpoint.DataInfo()


def test_only_the_checkpoint_module_reads_checkpoint_files():
    """Nothing but trainer/checkpoint.py knows cfg.json's keys or hashes the weights file: every other
    module goes through checkpoint.open / read_info."""
    repo = Path(__file__).resolve().parents[2]
    forbidden = ('"cfg.json"', '"weights.safetensors"', "CFG_FILE", "WEIGHTS_FILE", "load_checkpoint(",
                 "read_cfg(", "checkpoint_max_norm")
    # a sae-lens SAE folder is sae-lens's own format, whose config file happens to share the name
    allowed = {"trainer/index/saelens.py": {'"cfg.json"'}}
    offenders = []
    for path in sorted([*(repo / "trainer").rglob("*.py"), *(repo / "backend").rglob("*.py")]):
        if path == repo / "trainer" / "checkpoint.py":
            continue
        text, name = path.read_text(), str(path.relative_to(repo))
        found = [word for word in forbidden if word in text and word not in allowed.get(name, ())]
        offenders += [f"{name}: {word}" for word in found]
    assert offenders == []


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
