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

Everything else reads a checkpoint through `open(run_dir)` (the model with its typed description) or
`read_info(run_dir)` (the description alone): no other module knows cfg.json's keys or hashes the weights.

A save writes the whole directory under a temporary sibling name (`.<name>.tmp-<pid>-<token>`) and swaps it in
with two renames, so a reader never sees a half-written checkpoint; files in the run directory that a
checkpoint does not own (the training log, a user's notes) are carried over as hard links. A save that fails
in this process undoes itself. A process killed between the two renames leaves the previous checkpoint under
`.<name>.old-<pid>-<token>` and no `<name>`: readers then read that previous checkpoint where it lies, and the
next save puts it back.

Reading never renames or deletes anything. Only a save cleans up, and only leftovers untouched for
STALE_AFTER_S: a process id says nothing about a writer in another container sharing the folder, and a
temporary that is still changing may belong to a save under way there.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import math
import os
import secrets
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
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
STALE_AFTER_S = 3600.0
"""A save's leftover temporary is removed (or an aside checkpoint put back) only after this long unchanged:
a save under way, in this container or another one sharing the folder, keeps touching its temporary."""


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
    # pid for a person looking at the folder; the random token keeps names apart across containers, whose
    # processes may share a pid
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = run_dir.with_name(f".{run_dir.name}.tmp-{tag}")
    tmp.mkdir(parents=True)
    try:
        _write_checkpoint(tmp, model, model_info=model_info, training=training, data_info=data_info,
                          train_state=train_state)
        _swap_in(tmp, run_dir, tag)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return run_dir


def _write_checkpoint(
    tmp: Path,
    model: HSAE,
    *,
    model_info: dict[str, Any],
    training: dict[str, Any],
    data_info: dict[str, Any] | None,
    train_state: dict[str, Any] | None,
) -> None:
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


def _swap_in(tmp: Path, run_dir: Path, tag: str) -> None:
    """Replace run_dir by the complete checkpoint in `tmp`, carrying over the files a checkpoint does not own.
    If the second rename fails, the previous checkpoint goes back before the error propagates."""
    if not run_dir.exists():
        os.rename(tmp, run_dir)
        return
    for entry in run_dir.iterdir():
        if entry.name not in OWNED:
            _link_or_copy(entry, tmp / entry.name)
    old = run_dir.with_name(f".{run_dir.name}.old-{tag}")
    os.rename(run_dir, old)
    try:
        os.rename(tmp, run_dir)
    except BaseException:
        os.rename(old, run_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)  # a failure leaves a leftover that a later save removes


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
    recover(Path(run_dir))
    step = read_info(run_dir).step
    _write_json_atomic(Path(run_dir) / HIERARCHY_FILE, hierarchy_document(model, step, edge_stats))


def write_metrics(run_dir: str | Path, metrics: dict[str, Any]) -> None:
    recover(Path(run_dir))
    read_info(run_dir)
    _write_json_atomic(Path(run_dir) / METRICS_FILE, metrics)


def _write_saelens_level(path: Path, model: HSAE, level: int, model_info: dict[str, Any]) -> None:
    export = model.saelens_export(level)
    if export is None:
        return
    path.mkdir(parents=True)
    d_sae, d_in = export.W_dec_FD.shape
    jumprelu = export.threshold_F is not None
    cfg = {
        "architecture": "jumprelu" if jumprelu else "topk",
        "d_in": d_in,
        "d_sae": d_sae,
        **({} if jumprelu else {"k": export.k}),
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
            # a TopK level's floor: sae-lens also reports the firings below it
            **({"hsae_min_activation": export.min_activation} if export.min_activation else {}),
        },
    }
    named = {"W_enc": export.W_enc_DF, "b_enc": export.b_enc_F, "W_dec": export.W_dec_FD}
    named["b_dec"] = export.b_dec_D
    if jumprelu:
        named["threshold"] = export.threshold_F
    tensors = {name: t.detach().float().cpu().contiguous() for name, t in named.items()}
    save_file(tensors, path / SAELENS_WEIGHTS_FILE)
    _write_json(path / SAELENS_CFG_FILE, cfg)


# ---- reading ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    """The language model whose residual stream the run was trained on; all None for an activations file."""

    name: str | None = None
    layer: int | None = None
    hook: str | None = None


@dataclass(frozen=True)
class DataInfo:
    """What the run was trained on: rows of an activations file, or tokens of a corpus."""

    activations: str | None = None
    """The activations file (then `rows` says how many rows were read)."""
    rows: int | None = None
    corpus: Mapping[str, Any] | None = None
    """The corpus as the activation cache describes it (its "spec", a fingerprint, ...)."""
    tokens: int | None = None
    context_len: int | None = None

    @property
    def corpus_spec(self) -> str | None:
        return None if self.corpus is None else self.corpus.get("spec")


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint's cfg.json, checked and typed, without its weights (cheap: no tensor is read)."""

    run_dir: Path
    cfg: Mapping[str, Any] = field(repr=False)
    """cfg.json as written, for storing it whole (the indexed run's `config`); not for picking keys from."""
    arch: str
    d_in: int
    level_widths: list[int]
    arch_config: Mapping[str, Any]
    model_info: ModelInfo
    data_info: DataInfo
    step: int
    finished: bool
    batch_size: int | None
    seed: int | None
    max_norm: float
    """The massive-activation threshold training used (rows above it get no features); inf: none."""
    max_norm_multiple: float | None
    source_dir: Path = field(repr=False)
    """Where the files are read from: run_dir, or the previous checkpoint an interrupted save left aside."""

    @cached_property
    def digest(self) -> str:
        """sha256 hex digest of weights.safetensors: an indexed run's checkpoint_digest, which tells whether
        the checkpoint at a path is still the one that was indexed."""
        h = hashlib.sha256()
        try:
            with builtins.open(self.source_dir / WEIGHTS_FILE, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
        except OSError as err:
            raise CheckpointError(f"damaged checkpoint {self.run_dir}: cannot read {WEIGHTS_FILE} "
                                  f"({err.strerror or err})") from None
        return h.hexdigest()

    @cached_property
    def metrics(self) -> dict[str, Any] | None:
        """metrics.json (written by evaluation of these weights: a new save drops it), or None."""
        return read_metrics(self.source_dir)


@dataclass(frozen=True)
class Checkpoint(CheckpointInfo):
    """An opened checkpoint: its description and its model, in eval mode on the device it was opened on."""

    model: HSAE = field(default=None, repr=False)  # type: ignore[assignment]  # always set by open()


def is_checkpoint(run_dir: str | Path) -> bool:
    return (_source_dir(Path(run_dir)) / CFG_FILE).is_file()


def read_info(run_dir: str | Path) -> CheckpointInfo:
    """The checkpoint's description; CheckpointError with a one-line message if it is missing, damaged,
    foreign or of a newer version."""
    run_dir = Path(run_dir)
    source = _source_dir(run_dir)
    cfg = _read_cfg(run_dir, source)
    model = cfg.get("model") or {}
    data = cfg.get("data") or {}
    training = cfg["training"]
    try:
        max_norm = training.get("max_norm")
        info = CheckpointInfo(
            run_dir=run_dir,
            cfg=cfg,
            arch=cfg["arch"],
            d_in=int(cfg["d_in"]),
            level_widths=[int(level["width"]) for level in cfg["levels"]],
            arch_config=cfg["arch_config"],
            model_info=ModelInfo(model.get("name"), _int_or_none(model.get("layer")), model.get("hook")),
            data_info=DataInfo(
                activations=data.get("activations"),
                rows=_int_or_none(data.get("rows")),
                corpus=data.get("corpus"),
                tokens=_int_or_none(data.get("tokens")),
                context_len=_int_or_none(data.get("context_len")),
            ),
            step=int(training.get("step", 0)),
            finished=bool(training.get("finished", False)),
            batch_size=_int_or_none(training.get("batch_size")),
            seed=_int_or_none(training.get("seed")),
            # a run trained on every row, or by a version that did not record one, has no threshold
            max_norm=math.inf if max_norm is None else float(max_norm),
            max_norm_multiple=training.get("max_norm_multiple"),
            source_dir=source,
        )
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise CheckpointError(
            f"damaged checkpoint {run_dir}: {CFG_FILE} has a malformed field ({err})"
        ) from None
    return info


def open(run_dir: str | Path, device: str | torch.device = "cpu") -> Checkpoint:  # noqa: A001
    """The checkpoint with its model in eval mode on `device`."""
    info = read_info(run_dir)
    fields = {name: getattr(info, name) for name in CheckpointInfo.__dataclass_fields__}
    return Checkpoint(**fields, model=_load_model(info).to(device).eval())


def load_checkpoint(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[HSAE, dict[str, Any]]:
    """(model in eval mode on `device`, cfg.json as a dict): the raw document, for tests of the format."""
    ckpt = open(run_dir, device)
    return ckpt.model, dict(ckpt.cfg)


def read_metrics(run_dir: str | Path) -> dict[str, Any] | None:
    """metrics.json of a run directory (evaluation's output), or None when it has none."""
    path = _source_dir(Path(run_dir)) / METRICS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"damaged {path}: not valid JSON ({err})") from None


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _read_cfg(run_dir: Path, source: Path) -> dict[str, Any]:
    """cfg.json, checked to be ours and of a version this code reads."""
    if not source.is_dir():
        raise CheckpointError(f"no checkpoint at {run_dir}: the directory does not exist")
    path = source / CFG_FILE
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


def _load_model(info: CheckpointInfo) -> HSAE:
    run_dir = info.run_dir
    try:
        cls = model_class(info.arch)
    except ConfigError as err:
        raise CheckpointError(f"damaged checkpoint {run_dir}: {err}") from None
    weights = info.source_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"damaged checkpoint {run_dir}: {WEIGHTS_FILE} is missing")
    try:
        state = load_file(weights)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"damaged checkpoint {run_dir}: cannot read {WEIGHTS_FILE} ({err})") from None
    try:
        return cls.from_checkpoint({"arch": dict(info.arch_config), "d_in": info.d_in}, state)
    except ConfigError as err:
        raise CheckpointError(f"damaged checkpoint {run_dir}: bad arch_config ({err})") from None
    except RuntimeError as err:  # missing / unexpected / mis-shaped tensors
        first = str(err).strip().splitlines()
        detail = " ".join(first[:2])
        raise CheckpointError(
            f"damaged checkpoint {run_dir}: weights do not fit the config ({detail})"
        ) from None


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
def _aside(run_dir: Path) -> list[Path]:
    """Previous checkpoints that saves moved aside, oldest first."""
    return sorted(run_dir.parent.glob(f".{run_dir.name}.old-*"), key=_last_changed)


def _source_dir(run_dir: Path) -> Path:
    """Where run_dir's checkpoint is read: run_dir itself, or, when it is missing because a save was killed
    between its two renames, the previous checkpoint that save moved aside, read where it lies."""
    if run_dir.exists() or not run_dir.parent.is_dir():
        return run_dir
    aside = [p for p in _aside(run_dir) if (p / CFG_FILE).is_file()]
    return aside[-1] if aside else run_dir


def recover(run_dir: Path) -> None:
    """For writers only (a save, training about to resume): put back the previous checkpoint a killed save
    left aside, and remove leftover temporaries. Both only when unchanged for STALE_AFTER_S, so that a save
    under way in another process, in this container or another, is never disturbed."""
    run_dir = Path(run_dir)
    if not run_dir.parent.is_dir():
        return
    stale = [p for p in _aside(run_dir) if _is_stale(p)]
    if not run_dir.exists() and stale:
        os.rename(stale.pop(), run_dir)
    if run_dir.exists():
        temporaries = [p for p in run_dir.parent.glob(f".{run_dir.name}.tmp-*") if _is_stale(p)]
        for leftover in stale + temporaries:
            shutil.rmtree(leftover, ignore_errors=True)


def _last_changed(path: Path) -> float:
    """The latest modification or status change of `path` and everything under it. The status change counts
    because a rename (moving a checkpoint aside) and a hard link (carrying a file over) change only that."""
    latest = 0.0
    for root, dirs, files in os.walk(path):
        for name in [None, *dirs, *files]:
            try:
                st = os.lstat(root if name is None else os.path.join(root, name))
            except OSError:
                continue
            latest = max(latest, st.st_mtime, st.st_ctime)
    return latest


def _is_stale(path: Path) -> bool:
    return time.time() - _last_changed(path) > STALE_AFTER_S


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
