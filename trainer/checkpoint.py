"""Contract 2 (docs/contracts.md#contract-2-checkpoint-directory): the checkpoint directory, read and written
only here (format "hsae-checkpoint", version 1).

    cfg.json             format, version, arch, d_in, levels, model, normalization, training, data,
                         arch_config (the ArchConfig fields)
    weights.safetensors  every parameter and buffer (metadata: format, version, step)
    hierarchy.json       {"edges": [{"parent": [level, index], "child": [level, index], ...stats}]}
    metrics.json         written by evaluation (`write_metrics`)
    saelens/level_<i>/   each ordinary SAE level in sae-lens's on-disk format
                         (cfg.json, sae_weights.safetensors)
    train_state.pt       optimizer, scheduler, RNG and dead-latent state, for `train(..., resume=True)`

A save writes the whole directory under a temporary sibling name and swaps it in with two renames, so a
reader never sees a half-written checkpoint; files in the run directory that a checkpoint does not own (the
training log, a user's notes) are carried over as hard links. A crash between the two renames leaves the
previous checkpoint under `.<name>.old-<pid>`; the next load or save puts it back.
"""

from __future__ import annotations

import json
import os
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from trainer.config import ConfigError
from trainer.errors import HSAEError
from trainer.models import HSAE, model_class

FORMAT = "hsae-checkpoint"
VERSION = 1
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "weights.safetensors"
HIERARCHY_FILE = "hierarchy.json"
METRICS_FILE = "metrics.json"
TRAIN_STATE_FILE = "train_state.pt"
SAELENS_DIR = "saelens"
# what a save replaces; everything else in the run directory is carried over (metrics.json describes the
# previous weights, so a new save drops it)
OWNED = {CFG_FILE, WEIGHTS_FILE, HIERARCHY_FILE, METRICS_FILE, TRAIN_STATE_FILE, SAELENS_DIR}
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"  # sae_lens.constants.SAE_WEIGHTS_FILENAME
SAELENS_CFG_FILE = "cfg.json"  # sae_lens.constants.SAE_CFG_FILENAME


class CheckpointError(HSAEError):
    """A run directory is missing, damaged, foreign or of a newer format; the one-line message says which."""


# ---- writing ---------------------------------------------------------------------------------------------
def save_checkpoint(
    run_dir: str | Path,
    model: HSAE,
    *,
    model_info: dict[str, Any],
    training: dict[str, Any],
    data_info: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Writes (or atomically replaces) the checkpoint in `run_dir`; `training` must hold the "step"."""
    run_dir = Path(run_dir)
    recover(run_dir)
    tmp = run_dir.with_name(f".{run_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    step = int(training["step"])
    arch_cfg, state = model.to_checkpoint()
    cfg = {
        "format": FORMAT,
        "version": VERSION,
        "arch": model.arch,
        "d_in": model.d_in,
        "levels": model.level_info(),
        "model": dict(model_info),
        "normalization": model.normalization_info(),
        "training": dict(training),
        "data": dict(data_info or {}),
        "arch_config": arch_cfg["arch"],
        "written_by": f"hsae-forest {_version('hsae-forest')}",
    }
    meta = {"format": FORMAT, "version": str(VERSION), "step": str(step)}
    save_file(state, tmp / WEIGHTS_FILE, metadata=meta)
    _write_json(tmp / HIERARCHY_FILE, hierarchy_document(model, step))
    for level in range(len(model.level_widths)):
        _write_saelens_level(tmp / SAELENS_DIR / f"level_{level}", model, level, model_info)
    if train_state is not None:
        torch.save(train_state, tmp / TRAIN_STATE_FILE)
    _write_json(tmp / CFG_FILE, cfg)  # last: a directory with cfg.json is complete
    if run_dir.exists():
        for entry in run_dir.iterdir():
            if entry.name not in OWNED:
                _link_or_copy(entry, tmp / entry.name)
        old = run_dir.with_name(f".{run_dir.name}.old-{os.getpid()}")
        os.rename(run_dir, old)
        os.rename(tmp, run_dir)
        shutil.rmtree(old)
    else:
        os.rename(tmp, run_dir)
    return run_dir


def hierarchy_document(
    model: HSAE, step: int, edge_stats: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    edges = [{"parent": list(parent), "child": list(child)} for parent, child in model.edges()]
    if edge_stats is not None:
        if len(edge_stats) != len(edges):
            raise ValueError(f"{len(edge_stats)} edge stats for {len(edges)} edges")
        edges = [{**edge, **stats} for edge, stats in zip(edges, edge_stats)]
    return {
        "format": FORMAT, "version": VERSION, "step": step, "level_widths": model.level_widths, "edges": edges
    }


def write_hierarchy(run_dir: str | Path, model: HSAE, edge_stats: list[dict[str, Any]]) -> None:
    """Rewrites hierarchy.json with per-edge statistics (in `model.edges()` order), atomically."""
    step = read_cfg(run_dir)["training"].get("step", 0)
    _write_json_atomic(Path(run_dir) / HIERARCHY_FILE, hierarchy_document(model, step, edge_stats))


def write_metrics(run_dir: str | Path, metrics: dict[str, Any]) -> None:
    read_cfg(run_dir)
    _write_json_atomic(Path(run_dir) / METRICS_FILE, metrics)


def _write_saelens_level(path: Path, model: HSAE, level: int, model_info: dict[str, Any]) -> None:
    export = model.saelens_export(level)
    if export is None:
        return
    path.mkdir(parents=True)
    d_sae, d_in = export.W_dec_FD.shape
    cfg = {
        "architecture": "topk",
        "d_in": d_in,
        "d_sae": d_sae,
        "k": export.k,
        "rescale_acts_by_decoder_norm": False,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",  # our constant input scale is folded into the weights
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": _version("sae-lens", default="6.0.0"),
            "sae_lens_training_version": _version("sae-lens", default="6.0.0"),
            "model_name": model_info.get("name"),
            "hook_name": model_info.get("hook"),
            "hook_layer": model_info.get("layer"),
            "hsae_arch": model.arch,
            "hsae_level": level,
        },
    }
    named = {"W_enc": export.W_enc_DF, "b_enc": export.b_enc_F, "W_dec": export.W_dec_FD}
    named["b_dec"] = export.b_dec_D
    tensors = {name: t.detach().float().cpu().contiguous() for name, t in named.items()}
    save_file(tensors, path / SAELENS_WEIGHTS_FILE)
    _write_json(path / SAELENS_CFG_FILE, cfg)


# ---- reading ---------------------------------------------------------------------------------------------
def is_checkpoint(run_dir: str | Path) -> bool:
    recover(Path(run_dir))
    return (Path(run_dir) / CFG_FILE).is_file()


def read_cfg(run_dir: str | Path) -> dict[str, Any]:
    """cfg.json, checked to be ours and of a version this code reads."""
    run_dir = Path(run_dir)
    recover(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"no checkpoint at {run_dir}: the directory does not exist")
    path = run_dir / CFG_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not an HSAE checkpoint: it has no {CFG_FILE}")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"damaged checkpoint {run_dir}: {CFG_FILE} is not valid JSON ({err})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        hint = " (it looks like a sae-lens SAE directory)" if isinstance(cfg, dict) and "d_sae" in cfg else ""
        raise CheckpointError(
            f"{run_dir} is not an HSAE checkpoint: {CFG_FILE} has no format {FORMAT!r}{hint}"
        )
    version = cfg.get("version")
    if not isinstance(version, int):
        raise CheckpointError(f"damaged checkpoint {run_dir}: {CFG_FILE} has no integer version")
    if version > VERSION:
        raise CheckpointError(
            f"{run_dir} was written by a newer hsae-forest (checkpoint version {version}, this one reads "
            f"up to {VERSION}); upgrade hsae-forest"
        )
    for key in ("arch", "d_in", "levels", "arch_config", "training"):
        if key not in cfg:
            raise CheckpointError(f"damaged checkpoint {run_dir}: {CFG_FILE} lacks {key!r}")
    return cfg


def load_checkpoint(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[HSAE, dict[str, Any]]:
    """(model in eval mode on `device`, cfg.json as a dict)."""
    run_dir = Path(run_dir)
    cfg = read_cfg(run_dir)
    try:
        cls = model_class(cfg["arch"])
    except ConfigError as err:
        raise CheckpointError(f"damaged checkpoint {run_dir}: {err}") from None
    weights = run_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"damaged checkpoint {run_dir}: {WEIGHTS_FILE} is missing")
    try:
        state = load_file(weights)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"damaged checkpoint {run_dir}: cannot read {WEIGHTS_FILE} ({err})") from None
    try:
        model = cls.from_checkpoint({"arch": cfg["arch_config"], "d_in": cfg["d_in"]}, state)
    except ConfigError as err:
        raise CheckpointError(f"damaged checkpoint {run_dir}: bad arch_config ({err})") from None
    except RuntimeError as err:  # missing / unexpected / mis-shaped tensors
        first = str(err).strip().splitlines()
        detail = " ".join(first[:2])
        raise CheckpointError(
            f"damaged checkpoint {run_dir}: weights do not fit the config ({detail})"
        ) from None
    return model.to(device).eval(), cfg


def load_train_state(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / TRAIN_STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"cannot resume from {run_dir}: {TRAIN_STATE_FILE} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for a damaged pickle/zip
        raise CheckpointError(
            f"damaged checkpoint {run_dir}: cannot read {TRAIN_STATE_FILE} ({err})"
        ) from None


# ---- crash recovery and file helpers ---------------------------------------------------------------------
def recover(run_dir: Path) -> None:
    """Puts back the previous checkpoint if a save died between its two renames; drops stale temporaries."""
    run_dir = Path(run_dir)
    if not run_dir.parent.is_dir():
        return
    # a live writer's temporaries are its business: only those of dead processes are touched
    olds = [p for p in sorted(run_dir.parent.glob(f".{run_dir.name}.old-*")) if not _pid_alive(p)]
    if not run_dir.exists() and olds:
        os.rename(olds[-1], run_dir)
        olds = olds[:-1]
    if run_dir.exists():
        for stale in olds + sorted(run_dir.parent.glob(f".{run_dir.name}.tmp-*")):
            if not _pid_alive(stale):
                shutil.rmtree(stale, ignore_errors=True)


def _pid_alive(temporary: Path) -> bool:
    """Whether the process that named this temporary is still running (our own pid counts as not: a save of
    ours that is not running any more died)."""
    pid = temporary.name.rsplit("-", 1)[-1]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _link_or_copy(src: Path, dst: Path) -> None:
    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if src.is_dir():
        shutil.copytree(src, dst, copy_function=link)
    else:
        link(str(src), str(dst))


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _write_json(tmp, data)
    os.replace(tmp, path)


def _version(package: str, default: str = "0+unknown") -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return default
