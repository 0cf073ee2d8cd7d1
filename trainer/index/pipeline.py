"""Indexing a checkpoint: stream a corpus through the language model and the HSAE, and accumulate per-feature
statistics in bounded memory. It ends at plain data (`IndexedRun`: the accumulated result, what the run row
says, the contexts examples show, each feature's output tokens); publishing that to a database is the
backend's business (backend/index), so the trainer never touches one.

Activations come from the shard cache when it already holds them (same model, layer, corpus, context length),
so indexing right after training on the same corpus runs no language model forward at all.

Under torchrun (`torchrun --nproc-per-node N hsae index RUN`) the ranks split the work by context: rank r
encodes and accumulates the contexts whose id is r modulo N (whole contexts, as the accumulator needs), in
its own accumulator and context store; rank 0 gathers them, merges (the accumulators' merge is exact: the
same result as one process over every context) and alone goes on to publish. Rank 0 fills a missing
activation cache first and the others then read it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from trainer import distributed
from trainer.activations import DEFAULT_CONTEXT_LEN, PAD, ActivationCache
from trainer.checkpoint import Checkpoint
from trainer.errors import HSAEError
from trainer.index.accumulate import IndexAccumulator, IndexConfig, IndexResult
from trainer.index.contexts import ContextStore
from trainer.index.directions import OutputTokens, decoder_cosines, pair_cosines, top_output_tokens
from trainer.index.run import RunInfo
from trainer.lm import LanguageModel, load_language_model
from trainer.models.base import LevelCode, pad_codes
from trainer.outliers import encode_inliers

ENCODE_ROWS = 4096
RETAIN_EVERY = 8  # chunks between prunes of the context store


@dataclass
class IndexedRun:
    """Everything an index of a checkpoint produced, ready to be written."""

    result: IndexResult
    info: RunInfo
    contexts: ContextStore
    output_tokens: list[OutputTokens | None]  # per level, each feature's top output tokens
    edge_cosines: np.ndarray  # decoder cosine per edge, aligned with result.edges()
    relative_cosines: np.ndarray  # decoder cosine per row of result.relatives()
    tokens: int  # tokens indexed
    n_contexts: int


def token_display_table(tokenizer) -> list[str]:
    """Each vocabulary id as the text it stands for (" the", not "Ġthe"), built once per index run: decoding
    ids one by one for every stored context would cost millions of calls."""
    return [tokenizer.decode([i]) for i in range(len(tokenizer))]


def _unembedding(lm: LanguageModel) -> torch.Tensor:
    """W_U with the final norm's gain folded in, so a direction's logits are what the model would emit."""
    unembed_VD = lm.unembedding()
    norm = getattr(getattr(lm.model, "model", lm.model), "norm", None)
    weight = getattr(norm, "weight", None)
    if weight is not None and weight.shape[-1] == unembed_VD.shape[-1]:
        unembed_VD = unembed_VD * weight.detach().float()[None, :]
    return unembed_VD


def check_run_name(name: str) -> str:
    if not name.strip() or len(name) > 200:
        raise HSAEError(f"run name must be 1 to 200 characters, got {name!r}")
    return name


def index_run(
    ckpt: Checkpoint,
    *,
    corpus: str | None = None,
    tokens: int = 100_000,
    name: str | None = None,
    device: str = "auto",
    config: IndexConfig | None = None,
) -> IndexedRun | None:
    """Index an opened checkpoint (`checkpoint.open(run_dir)`) on `tokens` tokens of `corpus` (default: the
    corpus it was trained on), rounded up to whole contexts. Under torchrun every rank calls this; rank 0
    gets the whole run, the others None (see the module's docstring)."""
    model, model_info = ckpt.model, ckpt.model_info
    run_dir = ckpt.run_dir.resolve()
    if not model_info.name:
        raise HSAEError(
            f"{run_dir} was trained without a language model; indexing needs one to show contexts"
        )
    if tokens < 1:
        raise HSAEError(f"--tokens must be positive, got {tokens}")
    name = check_run_name(name or run_dir.name)

    corpus = corpus or ckpt.data_info.corpus_spec or "demo"
    context_len = ckpt.data_info.context_len or DEFAULT_CONTEXT_LEN
    lm = load_language_model(model_info.name, model_info.layer, device)
    if lm.d_model != model.d_in:
        raise HSAEError(f"{model_info.name} has width {lm.d_model}, the checkpoint expects {model.d_in}")
    cache = ActivationCache(lm, corpus, context_len)
    acc = IndexAccumulator(model.level_widths, model.edges(), config or IndexConfig())
    display = token_display_table(lm.tokenizer)
    dev = next(model.parameters()).device
    max_norm = ckpt.max_norm  # massive activations get no features, as in training
    streamed = stream_codes(cache, tokens, acc, display, lambda x_ND: _encode(model, x_ND, dev, max_norm))
    if streamed is None:
        return None  # a rank other than 0: its share went to rank 0
    store, n_rows, n_contexts, n_outliers = streamed
    result = acc.result()
    store.retain(result.context_ids())

    decoders = [model.decoder_directions(level).float().cpu() for level in range(len(model.level_widths))]
    unembed_VD = _unembedding(lm).cpu()
    output_tokens = [top_output_tokens(d, unembed_VD, lambda i: display[int(i)]) for d in decoders]
    edges = result.edges()
    cosines = decoder_cosines(
        decoders, edges.parent_level, edges.parent_idx, edges.child_level, edges.child_idx
    )
    info = RunInfo(
        name=name,
        model_name=model_info.name,
        layer=model_info.layer,
        hook=model_info.hook or lm.hook_name,
        arch=ckpt.arch,
        checkpoint_digest=ckpt.digest,
        config=dict(ckpt.cfg),
        corpus={**cache.info["corpus"], "context_len": context_len, "tokens": n_rows, "contexts": n_contexts,
                "outlier_tokens": n_outliers},
        metrics=ckpt.metrics,
        checkpoint_path=str(run_dir),
    )
    return IndexedRun(result, info, store, output_tokens, cosines, relative_cosines(result, decoders),
                      tokens=n_rows, n_contexts=n_contexts)


def relative_cosines(result: IndexResult, decoders: list[torch.Tensor]) -> np.ndarray:
    rel = result.relatives()
    return pair_cosines(decoders, rel.level, rel.idx, rel.rel_level, rel.rel_idx)


Encoder = Callable[[np.ndarray], tuple[list[tuple[np.ndarray, np.ndarray]], int]]


def stream_codes(
    cache: ActivationCache, tokens: int, acc: IndexAccumulator, display: list[str], encode: Encoder
) -> tuple[ContextStore, int, int, int] | None:
    """Feed `tokens` tokens of the cache's corpus (rounded up to whole contexts), encoded by `encode` (per
    level (indices, values), and how many rows were left out as massive), into `acc`; return the contexts
    the accumulator may still show, and how many rows, contexts and massive rows it saw. Under torchrun each
    rank feeds its share of the contexts, and rank 0 returns all ranks' merged into its own `acc` (the
    others return None)."""
    world = distributed.current()
    if not world.is_main:
        distributed.barrier()  # rank 0 fills the activation cache first; the others then read it
    source = cache.ensure(tokens)
    if world.is_main:
        distributed.barrier()
    contexts = cache.contexts(tokens)  # what ensure() just used; None would tokenize the whole corpus
    doc_ids = np.asarray(contexts.doc_ids, dtype=object)
    store = ContextStore(lambda ids: [display[i] for i in ids if i != PAD])
    # Whole contexts only: the accumulator needs every token of a context in one chunk, and a shard holds
    # whole contexts. The token budget is rounded up to the end of the context it falls in.
    end_ctx = int(source.read_meta(source.num_rows - 1, source.num_rows)[0, 0])
    n_rows, n_contexts, n_outliers = 0, 0, 0
    with tqdm(total=source.num_rows, desc="indexing", unit="tok", unit_scale=True,
              disable=not world.is_main) as bar:
        for chunk_no, (acts, meta) in enumerate(zip(source.acts, source.rows, strict=True)):
            context_N = np.asarray(meta[:, 0])
            keep = context_N <= end_ctx
            if not keep.any():
                break
            bar.update(int(keep.sum()))  # the corpus's progress, whichever rank encodes the rows
            keep &= context_N % world.size == world.rank
            if not keep.any():
                continue
            acts_ND, meta_N2 = np.asarray(acts[keep], dtype=np.float32), np.asarray(meta[keep])
            codes, outliers = encode(acts_ND)
            n_outliers += outliers
            acc.add(codes, meta_N2[:, 0], meta_N2[:, 1])
            ctx_ids = np.unique(meta_N2[:, 0])
            store.add(ctx_ids, contexts.token_ids_CT[ctx_ids], doc_ids[contexts.docs_C2[ctx_ids, 0]].tolist(),
                      contexts.docs_C2[ctx_ids, 1])
            if (chunk_no + 1) % RETAIN_EVERY == 0:
                store.retain(acc.kept_context_ids())
            n_rows += len(acts_ND)
            n_contexts += len(ctx_ids)
    if not world.parallel:
        return store, n_rows, n_contexts, n_outliers
    store.retain(acc.kept_context_ids())
    shares = distributed.gather_object((acc, store.arrays(), n_rows, n_contexts, n_outliers))
    if shares is None:
        return None
    for other, arrays, rows, n_ctx, outliers in shares[1:]:
        acc.merge(other)
        if len(arrays[0]):
            store.add(arrays[0], arrays[1], arrays[2].tolist(), arrays[3])
        n_rows, n_contexts, n_outliers = n_rows + rows, n_contexts + n_ctx, n_outliers + outliers
    return store, n_rows, n_contexts, n_outliers


@torch.no_grad()
def _encode(
    model, acts_ND: np.ndarray, device: torch.device, max_norm: float
) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
    """Per level (indices, values) of every row, none active on massive activations; and how many those
    were."""
    per_level: list[list[LevelCode]] = [[] for _ in model.level_widths]
    outliers = 0
    for lo in range(0, len(acts_ND), ENCODE_ROWS):
        x = torch.from_numpy(acts_ND[lo : lo + ENCODE_ROWS]).to(device)
        codes, outlier_N = encode_inliers(model, x, max_norm)
        outliers += int(outlier_N.sum())
        for level, code in enumerate(codes):
            per_level[level].append(LevelCode(code.indices.cpu(), code.values.float().cpu()))
    joined = [pad_codes(codes) for codes in per_level]  # a JumpReLU level's K differs between chunks
    return [(code.indices.numpy(), code.values.numpy()) for code in joined], outliers
