"""What the CLI commands do, end to end: open data, build or load a model, call the library, write results.

Kept apart from cli.py so that the demo and the tests call the same code as a user's command line.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer import checkpoint, distributed
from trainer.activations import PAD
from trainer.config import ArchConfig, ConfigError, RunConfig, read_config_file
from trainer.errors import HSAEError
from trainer.evaluate import ce_loss_recovered, evaluate, format_metrics
from trainer.lm import LanguageModel, resolve_device
from trainer.models.base import LevelCode, pad_codes
from trainer.models.registry import build_model
from trainer.settings import get_settings
from trainer.sources import DataSpec, OpenedData, open_data
from trainer.train import train

EVAL_TOKENS = 20_000
ENCODE_CORPUS_TOKENS = 20_000
CE_CONTEXTS = 16


def default_run_dir(arch: str) -> Path:
    return get_settings().subdir("runs") / f"{arch}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_training(data: DataSpec, run_cfg: RunConfig, out: Path | None, resume: bool = False) -> Path:
    """Trains one run; under torchrun every rank runs this and they train one model together
    (`trainer.distributed`): rank 0 names the run directory, extracts the activations first and writes."""
    world, joined = distributed.init_from_env(run_cfg.train.device)
    try:
        return _run_training(data, run_cfg, out, resume, world)
    finally:
        if joined:
            distributed.close()


def _run_training(data: DataSpec, run_cfg: RunConfig, out: Path | None, resume: bool,
                  world: distributed.World) -> Path:
    if run_cfg.train.batch_size % world.size:
        raise ConfigError(f"batch size {run_cfg.train.batch_size} is not divisible by the {world.size} "
                          "processes: each rank reads an equal slice of every batch")
    run_dir = Path(out) if out is not None else default_run_dir(run_cfg.arch.arch)
    run_dir = Path(distributed.broadcast_object(str(run_dir)))
    if resume and not checkpoint.is_checkpoint(run_dir):
        raise HSAEError(f"nothing to resume: {run_dir} holds no checkpoint")
    if resume:
        saved = checkpoint.read_info(run_dir)
        if saved.arch != run_cfg.arch.arch:
            raise HSAEError(f"{run_dir} holds a {saved.arch!r} run; resume it with --arch {saved.arch}")
        data = replace(data, **_data_overrides_from(saved))
    batch = run_cfg.train.batch_size
    if data.activations is None and data.tokens is not None and batch > data.tokens:
        # a corpus yields at most --tokens rows: say so before loading the model (train() checks the rows)
        raise ConfigError(f"batch size {batch} exceeds the {data.tokens} tokens of activations asked for: "
                          "lower --batch or raise --tokens")
    if not world.is_main:
        distributed.barrier()  # rank 0 fills the activation cache first; the others then read it
    opened = open_data(data)
    if world.is_main:
        distributed.barrier()
    run_cfg.arch.validate_for(opened.source.d_in)
    model = build_model(run_cfg.arch, opened.source.d_in, seed=run_cfg.train.seed)
    train(model, opened.source, run_cfg.train, run_dir, model_info=opened.model_info,
          data_info=opened.data_info, resume=resume)
    return run_dir


def _data_overrides_from(saved: checkpoint.CheckpointInfo) -> dict[str, Any]:
    """A resumed run reads the data it started with, whatever the flags say."""
    data, model = saved.data_info, saved.model_info
    if data.activations is not None:
        return {"activations": data.activations, "corpus": None, "tokens": data.rows}
    if data.corpus is not None:
        return {"corpus": data.corpus_spec, "activations": None, "tokens": data.tokens,
                "model": model.name, "layer": model.layer, "context_len": data.context_len}
    return {}


def _eval_data(ckpt: checkpoint.CheckpointInfo, corpus: str | None, activations: str | None,
               tokens: int, device: str) -> tuple[OpenedData, int]:
    """The evaluation data and the first row to use: held-out rows after the training ones when evaluating on
    the training corpus, so that a run is never scored on what it was fitted to."""
    model, trained_on = ckpt.model_info, ckpt.data_info
    if activations is None and corpus is None:
        if trained_on.activations is not None:
            activations = trained_on.activations
        elif trained_on.corpus is not None:
            corpus = trained_on.corpus_spec
        else:
            corpus = "demo"
    if activations is None and not model.name:
        raise HSAEError(
            f"{ckpt.run_dir} was trained without a language model: evaluate it with --activations FILE"
        )
    skip = 0
    same_corpus = activations is None and trained_on.corpus is not None and corpus == trained_on.corpus_spec
    if same_corpus:
        skip = trained_on.tokens or 0
    spec = DataSpec(
        model=model.name or DataSpec.model, layer=model.layer or 0, corpus=corpus,
        activations=activations, tokens=skip + tokens, device=device,
        context_len=trained_on.context_len or DataSpec.context_len,
    )
    opened = open_data(spec)
    if opened.source.num_rows - skip < min(tokens, 1_000):
        skip = 0  # the corpus has nothing held out: evaluate on its start, and say so in the metrics
    return opened, skip


def corpus_ce_loss(lm: LanguageModel, tokens_CT: np.ndarray):
    """ce_loss(replace_fn) over fixed contexts; the replacement applies to text positions only (never to the
    BOS at position 0, which no HSAE is trained on), and so does the zero ablation it is compared with."""
    present = tokens_CT != PAD
    ids = torch.from_numpy(np.where(present, tokens_CT, 0).astype(np.int64))
    mask = torch.from_numpy(present.astype(np.int64))

    def ce_loss(replace_fn):
        if replace_fn is None:
            return lm.ce_loss(ids, None, mask)
        return lm.ce_loss(ids, lambda h: torch.cat([h[:, :1], replace_fn(h[:, 1:])], dim=1), mask)

    return ce_loss


def run_eval(run_dir: Path, corpus: str | None, activations: str | None, tokens: int, device: str,
             baseline: Path | None) -> tuple[dict[str, Any], str]:
    ckpt = checkpoint.open(run_dir, device=resolve_device(device))
    model = ckpt.model
    opened, skip = _eval_data(ckpt, corpus, activations, tokens, device)
    if opened.source.d_in != model.d_in:
        raise HSAEError(
            f"the evaluation activations have width {opened.source.d_in}, the run expects {model.d_in}"
        )
    n = min(tokens, opened.source.num_rows - skip)
    batches = (
        torch.from_numpy(opened.source.read(lo, min(lo + 4096, skip + n)))
        for lo in range(skip, skip + n, 4096)
    )
    # massive activations are left out with the threshold the run was trained with, as index and live do
    max_norm = ckpt.max_norm
    metrics = evaluate(model, batches, max_norm=max_norm)
    edge_stats = metrics.pop("edge_stats")
    metrics["data"] = {**opened.data_info, "eval_rows": [skip, skip + n], "held_out": skip > 0}
    metrics["outliers"] = {"max_norm_multiple": ckpt.max_norm_multiple,
                           "max_norm": max_norm if math.isfinite(max_norm) else None,
                           "rows": metrics.pop("outlier_rows")}
    if opened.lm is not None and opened.cache is not None:
        contexts = opened.cache.contexts(skip + tokens).token_ids_CT
        first = int(opened.source.read_meta(skip, skip + 1)[0, 0]) if skip else 0
        chosen = contexts[first : first + CE_CONTEXTS]
        metrics["ce"] = ce_loss_recovered(corpus_ce_loss(opened.lm, chosen), model, max_norm)
    checkpoint.write_hierarchy(run_dir, model, edge_stats)
    checkpoint.write_metrics(run_dir, metrics)
    base = None
    if baseline is not None:
        base = checkpoint.read_metrics(baseline)
        if base is None:
            raise HSAEError(
                f"baseline {baseline} has no {checkpoint.METRICS_FILE}: run `hsae eval {baseline}` first"
            )
    names = (Path(run_dir).name[:11], Path(baseline).name[:11] if baseline else "")
    table = format_metrics(metrics, base, names=names)
    return metrics, table


def run_encode(run_dir: Path, corpus: str | None, activations: str | None, tokens: int | None, device: str,
               out: Path) -> dict[str, Any]:
    """docs/contracts.md#hsae-encode-output: per level i, level_{i}_indices (int64, -1 = unused slot) and
    level_{i}_values, [N, K_i]; from a corpus also token_ids [N] and context_position [N, 2] so rows can be
    traced back to text.
    `tokens` limits the rows; None: every row of an activations file, ENCODE_CORPUS_TOKENS of a corpus."""
    from safetensors.torch import save_file

    if (corpus is None) == (activations is None):
        raise HSAEError("give exactly one of --activations FILE or --corpus SPEC")
    if out.suffix != ".safetensors":
        raise HSAEError(f"--out must end in .safetensors, got {out.name}")
    ckpt = checkpoint.open(run_dir, device=resolve_device(device))
    model, model_info = ckpt.model, ckpt.model_info
    if corpus is not None and not model_info.name:
        raise HSAEError(f"{run_dir} was trained without a language model: encode it with --activations FILE")
    if tokens is None and corpus is not None:
        tokens = ENCODE_CORPUS_TOKENS
    spec = DataSpec(model=model_info.name or DataSpec.model, layer=model_info.layer or 0,
                    corpus=corpus, activations=activations, tokens=tokens, device=device)
    opened = open_data(spec)
    if opened.source.d_in != model.d_in:
        raise HSAEError(f"the activations have width {opened.source.d_in}, the run expects {model.d_in}")
    n = opened.source.num_rows
    parts: list[list[LevelCode]] = [[] for _ in model.level_widths]
    with torch.no_grad():
        for lo in range(0, n, 4096):
            rows = opened.source.read(lo, min(lo + 4096, n))
            x = torch.from_numpy(rows).to(next(model.parameters()).device)
            for i, code in enumerate(model.encode(x)):
                parts[i].append(LevelCode(code.indices.cpu(), code.values.float().cpu()))
    tensors = {}
    for i in range(len(model.level_widths)):
        joined = pad_codes(parts[i])  # a JumpReLU level's K differs between chunks
        tensors[f"level_{i}_indices"] = joined.indices.to(torch.int64).contiguous()
        tensors[f"level_{i}_values"] = joined.values.contiguous()
    if opened.cache is not None:
        meta = opened.source.read_meta(0, n).astype(np.int64)
        contexts = opened.cache.contexts(tokens).token_ids_CT
        tensors["context_position"] = torch.from_numpy(meta)
        tensors["token_ids"] = torch.from_numpy(contexts[meta[:, 0], meta[:, 1]].astype(np.int64))
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    save_file(tensors, str(partial), metadata={"run": str(run_dir), "arch": model.arch})
    partial.replace(out)
    return {"rows": n, "levels": len(model.level_widths)}


def build_run_config(config_file: Path | None, arch: str | None, sizes: dict[str, Any],
                     train_opts: dict[str, Any], preset: str | None = None) -> RunConfig:
    """Defaults < the preset < config file < flags given on the command line (None = not given)."""
    data = read_config_file(config_file) if config_file is not None else {}
    arch_fields, train_fields = dict(data.get("arch", {})), dict(data.get("train", {}))
    if arch is not None and arch != arch_fields.get("arch", ArchConfig.arch):
        # A different architecture starts from its own defaults, not the file's sizes for another one.
        arch_fields = {"arch": arch, **({"preset": arch_fields["preset"]} if "preset" in arch_fields else {})}
    arch_fields.update({k: v for k, v in sizes.items() if v is not None})
    train_fields.update({k: v for k, v in train_opts.items() if v is not None})
    return RunConfig.compose(arch_fields, train_fields, preset)

