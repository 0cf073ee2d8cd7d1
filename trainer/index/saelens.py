"""Indexing SAEs saved in sae-lens's on-disk format (`hsae index-sae`), loaded with sae-lens itself so that
every architecture it loads works (standard, topk, jumprelu, gated, matryoshka batchtopk saved as jumprelu,
...).

How the SAEs become levels of a forest:
- several SAEs: one level each, narrowest on top;
- one Matryoshka SAE (its cfg, or its training metadata, holds `matryoshka_widths`): its nested groups, the
  first group on top;
- one plain SAE: a flat forest (level 0 only).
Between two levels each feature gets as parent the feature of the level above it co-fires with most over the
indexed tokens (P(parent | child)), and the `unassigned_fraction` of children with the lowest such probability
none: the post-hoc tree of trainer/coactivation.py, computed from the index accumulator's pair counts after
the one pass over the corpus. Like `index_run`, this ends at plain data (`IndexedRun`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.activations import DEFAULT_CONTEXT_LEN, ActivationCache
from trainer.coactivation import coactivation_parents
from trainer.errors import HSAEError
from trainer.index.accumulate import IndexAccumulator, IndexConfig
from trainer.index.directions import decoder_cosines, top_output_tokens
from trainer.index.pipeline import (
    ENCODE_ROWS,
    IndexedRun,
    _unembedding,
    check_run_name,
    relative_cosines,
    stream_codes,
    token_display_table,
)
from trainer.index.run import RunInfo
from trainer.lm import DEFAULT_MODEL, LanguageModel, converted_default_model, load_language_model

SAELENS_CONFIG = "cfg.json"  # sae-lens's own names (sae_lens.constants)
SAELENS_WEIGHTS = "sae_weights.safetensors"
RESID_POST = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")
DEFAULT_UNASSIGNED = 0.2  # as the Tree HSAE's default (trainer/config.py)


@dataclass(frozen=True)
class LevelSource:
    """Where one level's features come from: features [start, stop) of the SAE in `path`."""

    path: str
    architecture: str
    d_sae: int
    start: int
    stop: int
    matryoshka_group: int | None = None

    @property
    def width(self) -> int:
        return self.stop - self.start

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "architecture": self.architecture, "d_sae": self.d_sae,
                "features": [self.start, self.stop], "width": self.width,
                "matryoshka_group": self.matryoshka_group}


@dataclass
class SAEFamily:
    """The opened SAEs, and the levels they give (top first)."""

    saes: list[Any]  # sae_lens SAE objects, by ascending width
    levels: list[tuple[int, LevelSource]]  # (which SAE, its slice) per level
    d_in: int
    model_name: str
    layer: int
    hook: str
    digest: str

    @property
    def level_widths(self) -> list[int]:
        return [src.width for _, src in self.levels]

    def decoders(self) -> list[torch.Tensor]:
        return [self.saes[s].W_dec.detach()[src.start : src.stop].float().cpu() for s, src in self.levels]

    @torch.no_grad()
    def encode(self, acts_ND: np.ndarray) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
        """Per level (indices [N, K], -1 unused; values [N, K]) of the features with a positive activation."""
        per_level: list[tuple[list, list]] = [([], []) for _ in self.levels]
        for lo in range(0, len(acts_ND), ENCODE_ROWS):
            x = torch.from_numpy(acts_ND[lo : lo + ENCODE_ROWS])
            dense = [None] * len(self.saes)
            for level, (s, src) in enumerate(self.levels):
                if dense[s] is None:
                    sae = self.saes[s]
                    dense[s] = sae.encode(x.to(sae.W_dec.device, sae.W_dec.dtype)).float().cpu()
                indices, values = _sparse(dense[s][:, src.start : src.stop])
                per_level[level][0].append(indices)
                per_level[level][1].append(values)
        return [_concat(i, v) for i, v in per_level], 0


def _sparse(acts_NF: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    k = max(int((acts_NF > 0).sum(1).max()) if len(acts_NF) else 0, 1)
    values, indices = acts_NF.topk(k, dim=1)
    indices[values <= 0] = -1
    return indices.numpy().astype(np.int64), values.clamp(min=0).numpy()


def _concat(indices: list[np.ndarray], values: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    k = max(a.shape[1] for a in indices)
    pad = [np.pad(a, ((0, 0), (0, k - a.shape[1])), constant_values=-1) for a in indices]
    padv = [np.pad(a, ((0, 0), (0, k - a.shape[1]))) for a in values]
    return np.concatenate(pad), np.concatenate(padv)


def _read_saelens_cfg(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise HSAEError(f"{path}: no such folder")
    needed = (SAELENS_CONFIG, SAELENS_WEIGHTS)
    if not path.is_dir() or not all((path / name).is_file() for name in needed):
        raise HSAEError(f"{path} is not a sae-lens SAE folder (it needs {' and '.join(needed)})")
    try:
        cfg = json.loads((path / SAELENS_CONFIG).read_text())
    except (OSError, ValueError) as err:
        raise HSAEError(f"{path / SAELENS_CONFIG}: not readable JSON ({err})") from None
    if not isinstance(cfg, dict) or not {"d_in", "d_sae"} <= cfg.keys():
        raise HSAEError(f"{path / SAELENS_CONFIG} is not a sae-lens SAE config (no d_in and d_sae)")
    return cfg


def _matryoshka_widths(cfg: dict[str, Any]) -> list[int] | None:
    details = (cfg.get("metadata") or {}).get("training_architecture_details") or {}
    widths = cfg.get("matryoshka_widths") or details.get("matryoshka_widths")
    return [int(w) for w in widths] if widths else None


def _digest(paths: list[Path]) -> str:
    total = hashlib.sha256()
    for path in paths:
        h = hashlib.sha256()
        with open(path / SAELENS_WEIGHTS, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        total.update(h.digest())
    return total.hexdigest()


def open_saes(dirs: list[Path], *, model: str | None = None, layer: int | None = None,
              device: str | torch.device = "cpu") -> SAEFamily:
    """Check and load the SAEs of `dirs`; every problem is one HSAEError before anything heavy runs."""
    if not dirs:
        raise HSAEError("give at least one SAE folder")
    paths = [Path(d).resolve() for d in dirs]
    if len(set(paths)) < len(paths):
        raise HSAEError("the same SAE folder was given twice")
    cfgs = [_read_saelens_cfg(p) for p in paths]
    hooks = {str(p): (c.get("metadata") or {}).get("hook_name") or c.get("hook_name")
             for p, c in zip(paths, cfgs, strict=True)}
    named = {h for h in hooks.values() if h}
    if len(named) > 1:
        listed = ", ".join(f"{Path(p).name} on {h}" for p, h in hooks.items())
        raise HSAEError(f"the SAEs read different hooks ({listed}); index SAEs of one hook together")
    d_ins = {int(c["d_in"]) for c in cfgs}
    if len(d_ins) > 1:
        raise HSAEError(f"the SAEs have different input widths d_in {sorted(d_ins)}; they must read one hook")
    hook = named.pop() if named else None
    if hook is not None and (m := RESID_POST.match(hook)) is None:
        raise HSAEError(f"hook {hook!r} is not a residual-stream output (blocks.N.hook_resid_post), the only "
                        "activations HSAE Forest reads")
    if layer is None:
        if hook is not None:
            layer = int(m.group(1))
        else:
            raise HSAEError("the SAE config names no hook; pass --layer")
    metadata = cfgs[0].get("metadata") or {}
    model_name = model or metadata.get("model_name") or cfgs[0].get("model_name") or DEFAULT_MODEL

    from sae_lens import SAE  # slow to import: only once the folders look right

    saes = []
    for path in paths:
        try:
            saes.append(SAE.load_from_disk(path, device=str(device)).eval())
        except Exception as err:  # noqa: BLE001 - whatever sae-lens raises on a folder it cannot load
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise HSAEError(f"{path}: sae-lens could not load it ({first})") from None
    order = sorted(range(len(paths)), key=lambda i: int(cfgs[i]["d_sae"]))
    saes = [saes[i] for i in order]
    paths, cfgs = [paths[i] for i in order], [cfgs[i] for i in order]

    levels: list[tuple[int, LevelSource]] = []
    widths = _matryoshka_widths(cfgs[0]) if len(paths) == 1 else None
    if widths is not None:
        d_sae = int(cfgs[0]["d_sae"])
        if widths != sorted(set(widths)) or widths[-1] != d_sae or widths[0] < 1:
            raise HSAEError(f"{paths[0]}: matryoshka_widths {widths} must rise to d_sae {d_sae}")
        arch = str(cfgs[0].get("architecture"))
        for group, (start, stop) in enumerate(zip([0, *widths[:-1]], widths, strict=True)):
            levels.append((0, LevelSource(str(paths[0]), arch, d_sae, start, stop, group)))
    else:
        for s, (path, cfg) in enumerate(zip(paths, cfgs, strict=True)):
            d_sae = int(cfg["d_sae"])
            levels.append((s, LevelSource(str(path), str(cfg.get("architecture")), d_sae, 0, d_sae)))
    return SAEFamily(saes, levels, d_ins.pop(), model_name, layer, hook or f"blocks.{layer}.hook_resid_post",
                     _digest(paths))


def check_model(family: SAEFamily) -> None:
    """The model's width and depth against the SAEs, from its config alone (before any weights load)."""
    from transformers import AutoConfig

    source = converted_default_model() if family.model_name == DEFAULT_MODEL else family.model_name
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HSAEError(f"cannot load model {family.model_name!r}: {first}; pass --model") from None
    width = getattr(config, "hidden_size", None)
    if width is not None and width != family.d_in:
        raise HSAEError(f"{family.model_name} has width {width}, the SAEs expect d_in {family.d_in}")
    n_layers = getattr(config, "num_hidden_layers", None)
    if n_layers is not None and not 0 <= family.layer < n_layers:
        raise HSAEError(f"layer {family.layer} is out of range for {family.model_name!r}, which has layers "
                        f"0..{n_layers - 1}")


def load_model_for(family: SAEFamily, device: str) -> LanguageModel:
    """The language model the SAEs read, checked against their input width."""
    check_model(family)
    lm = load_language_model(family.model_name, family.layer, device)
    if lm.d_model != family.d_in:
        raise HSAEError(f"{family.model_name} has width {lm.d_model}, the SAEs expect d_in {family.d_in}")
    return lm


def infer_tree(acc: IndexAccumulator, unassigned_fraction: float) -> None:
    """Each feature's parent: the feature of the level above it co-fires with most (the post-hoc tree)."""
    for level in range(1, len(acc.level_widths)):
        best, count = acc.pairs[(level - 1, level)].best_upper(acc.level_widths[level - 1])
        fired = acc.fire_count(level)
        score = np.where(count > 0, count / np.maximum(fired, 1), -1.0)
        parents = coactivation_parents(torch.from_numpy(best), torch.from_numpy(score), unassigned_fraction)
        acc.set_parents(level, parents.numpy())


def index_saes(
    family: SAEFamily,
    lm: LanguageModel,
    *,
    name: str,
    corpus: str | None = None,
    tokens: int = 100_000,
    unassigned_fraction: float = DEFAULT_UNASSIGNED,
    config: IndexConfig | None = None,
) -> IndexedRun:
    """Index the opened SAEs on `tokens` tokens of `corpus` (default: the demo corpus) as one run."""
    if tokens < 1:
        raise HSAEError(f"--tokens must be positive, got {tokens}")
    if not 0 <= unassigned_fraction < 1:
        raise HSAEError(f"--unassigned must be in [0, 1), got {unassigned_fraction}")
    name = check_run_name(name)
    corpus = corpus or "demo"
    cache = ActivationCache(lm, corpus, DEFAULT_CONTEXT_LEN)
    acc = IndexAccumulator(family.level_widths, (), config or IndexConfig())
    display = token_display_table(lm.tokenizer)
    streamed = stream_codes(cache, tokens, acc, display, family.encode)
    assert streamed is not None  # `index-sae` runs as one process (it never joins a torchrun group)
    store, n_rows, n_contexts, _ = streamed
    infer_tree(acc, unassigned_fraction)
    result = acc.result()
    store.retain(result.context_ids())

    decoders = family.decoders()
    unembed_VD = _unembedding(lm).cpu()
    output_tokens = [top_output_tokens(d, unembed_VD, lambda i: display[int(i)]) for d in decoders]
    edges = result.edges()
    cosines = decoder_cosines(
        decoders, edges.parent_level, edges.parent_idx, edges.child_level, edges.child_idx)
    sources = [src.to_dict() for _, src in family.levels]
    info = RunInfo(
        name=name,
        model_name=family.model_name,
        layer=family.layer,
        hook=family.hook,
        arch="sae-lens",
        checkpoint_digest=family.digest,
        config={"source": "sae-lens", "levels": sources, "tree": "co-firing",
                "unassigned_fraction": unassigned_fraction if len(sources) > 1 else None},
        corpus={**cache.info["corpus"], "context_len": DEFAULT_CONTEXT_LEN, "tokens": n_rows,
                "contexts": n_contexts},
    )
    return IndexedRun(result, info, store, output_tokens, cosines, relative_cosines(result, decoders),
                      tokens=n_rows, n_contexts=n_contexts)
