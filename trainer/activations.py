"""Activation extraction and the on-disk cache of activation shards.

A cache folder is keyed by model, layer, corpus and context length:

    data/activations/<key>/
        info.json              what the cache holds (model, layer, hook, corpus, context length, d_model)
        contexts.npy           int32 [C, T]: the token ids fed to the model; -1 = padding; column 0 is the BOS
                               prefix that takes the attention-sink role and never reaches the data
        context_docs.npy       int32 [C, 2]: (document number, first token's offset in that document)
        documents.json         document ids, by document number
        shards/shard_00000/    acts.npy float32 [n, D] and rows.npy int32 [n, 2] = (context, position) for
                               contexts [i*S, (i+1)*S); a shard folder appears only when complete (renamed
                               from a temporary name), so an interrupted extraction resumes at the next shard

Only real text tokens become rows: no BOS, no special token, no padding.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from trainer.corpus import describe, iter_documents
from trainer.data import TensorSource
from trainer.errors import HSAEError
from trainer.lm import LanguageModel
from trainer.settings import get_settings

DEFAULT_CONTEXT_LEN = 128
SHARD_TOKENS = 32_768
PAD = -1


# ---------------------------------------------------------------------------------------------------------
# Tokenization into fixed-length contexts


@dataclass
class Contexts:
    token_ids_CT: np.ndarray  # int32, PAD where there is no token
    docs_C2: np.ndarray  # int32 (document number, offset of the context's first text token)
    doc_ids: list[str]
    exhausted: bool  # the whole corpus is in here (asking for more tokens cannot give more)

    @property
    def data_mask_CT(self) -> np.ndarray:
        mask = self.token_ids_CT != PAD
        mask[:, 0] = False  # the BOS prefix
        return mask

    @property
    def n_tokens(self) -> int:
        return int(self.data_mask_CT.sum())


def tokenize_corpus(spec: str, tokenizer, context_len: int, max_tokens: int | None) -> Contexts:
    """Split each document into windows of context_len - 1 text tokens behind a BOS prefix.

    Windows never cross documents (an example on a feature page is one document's text); the last window of a
    document is right-padded. Special tokens that appear in the text are dropped so they never reach the data.
    """
    if context_len < 2:
        raise HSAEError(f"context length must be at least 2 (a BOS prefix and one token), got {context_len}")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise HSAEError("the tokenizer has neither a BOS nor an EOS token to start each context with")
    special = np.array(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
    width = context_len - 1
    rows: list[np.ndarray] = []
    docs: list[tuple[int, int]] = []
    doc_ids: list[str] = []
    total, exhausted = 0, True
    batch: list = []

    def flush() -> bool:
        nonlocal total
        encoded = tokenizer([d.text for d in batch], add_special_tokens=False)["input_ids"]
        for doc, ids in zip(batch, encoded, strict=True):
            ids = np.asarray(ids, dtype=np.int64)
            ids = ids[~np.isin(ids, special)]
            if ids.size == 0:
                continue
            doc_no = len(doc_ids)
            doc_ids.append(doc.id)
            for start in range(0, ids.size, width):
                piece = ids[start : start + width]
                if max_tokens is not None and total >= max_tokens:
                    return False
                row = np.full(context_len, PAD, dtype=np.int32)
                row[0] = bos
                row[1 : 1 + piece.size] = piece
                rows.append(row)
                docs.append((doc_no, start))
                total += piece.size
        batch.clear()
        return True

    batch_chars = 0
    with tqdm(desc="tokenizing", unit=" docs", leave=False) as bar:
        for doc in iter_documents(spec):
            batch.append(doc)
            batch_chars += len(doc.text)
            bar.update()
            # Batches are sized by text volume and by what is still needed (about 4 characters a token), so a
            # small --tokens does not tokenize whole books.
            wanted = None if max_tokens is None else 6 * (max_tokens - total) + 1_000
            if batch_chars >= min(2_000_000, wanted or 2_000_000):
                batch_chars = 0
                if not flush():
                    exhausted = False
                    break
        else:
            if batch and not flush():
                exhausted = False
    if not rows:
        raise HSAEError(f"corpus {spec!r} yields no tokens")
    return Contexts(np.stack(rows), np.asarray(docs, dtype=np.int32).reshape(-1, 2), doc_ids, exhausted)


# ---------------------------------------------------------------------------------------------------------
# The cache


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + f".partial-{os.getpid()}.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".partial-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ActivationCache:
    """Activations of one (model, layer, corpus, context length), extracted once, reused by train and
    index."""

    def __init__(self, lm: LanguageModel, corpus: str, context_len: int = DEFAULT_CONTEXT_LEN,
                 root: Path | None = None, shard_tokens: int = SHARD_TOKENS):
        self.lm, self.corpus, self.context_len = lm, corpus, context_len
        corpus_info = describe(corpus)
        self.info = {
            "model": lm.name,
            "layer": lm.layer,
            "hook": lm.hook_name,
            "d_model": lm.d_model,
            "corpus": corpus_info,
            "context_len": context_len,
            "shard_contexts": max(1, shard_tokens // context_len),
            "dtype": "float32",
        }
        key_fields = ("model", "layer", "corpus", "context_len", "shard_contexts")
        key_src = json.dumps({k: self.info[k] for k in key_fields}, sort_keys=True)
        self.key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
        self.path = (root or get_settings().subdir("activations")) / self.key
        self.shard_contexts: int = self.info["shard_contexts"]

    # -- contexts ----------------------------------------------------------------------------------------
    def contexts(self, n_tokens: int | None) -> Contexts:
        """The tokenized corpus, covering at least n_tokens text tokens where the corpus has them."""
        meta = self.path / "contexts.json"
        if meta.is_file():
            saved = json.loads(meta.read_text())
            if saved["exhausted"] or (n_tokens is not None and saved["n_tokens"] >= n_tokens):
                return Contexts(
                    np.load(self.path / "contexts.npy"),
                    np.load(self.path / "context_docs.npy"),
                    json.loads((self.path / "documents.json").read_text()),
                    saved["exhausted"],
                )
        ctx = tokenize_corpus(self.corpus, self.lm.tokenizer, self.context_len, n_tokens)
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(self.path / "info.json", json.dumps(self.info, indent=2))
        _atomic_save_npy(self.path / "contexts.npy", ctx.token_ids_CT)
        _atomic_save_npy(self.path / "context_docs.npy", ctx.docs_C2)
        _atomic_write_text(self.path / "documents.json", json.dumps(ctx.doc_ids))
        # Written last: the three files above are valid together only once this one says so.
        _atomic_write_text(self.path / "contexts.json",
                           json.dumps({"n_tokens": ctx.n_tokens, "exhausted": ctx.exhausted}))
        return ctx

    # -- shards ------------------------------------------------------------------------------------------
    def shard_dir(self, i: int) -> Path:
        return self.path / "shards" / f"shard_{i:05d}"

    def _clean_partials(self) -> None:
        for partial in (self.path / "shards").glob("*.partial-*"):
            pid = int(partial.name.rsplit("-", 1)[1])
            if not _pid_alive(pid) or pid == os.getpid():
                shutil.rmtree(partial, ignore_errors=True)

    def ensure(self, n_tokens: int | None, batch_contexts: int = 16,
               on_shard: Callable[[int], None] | None = None) -> ShardSource:
        """Extract whatever shards are missing for the first n_tokens tokens, then serve them.

        `on_shard(i)` is called after shard i is complete (tests use it to simulate an interruption).
        """
        ctx = self.contexts(n_tokens)
        mask_CT = ctx.data_mask_CT
        cum = np.cumsum(mask_CT.sum(axis=1))
        n_ctx = len(cum) if n_tokens is None else min(len(cum), int(np.searchsorted(cum, n_tokens)) + 1)
        n_shards = -(-n_ctx // self.shard_contexts)
        (self.path / "shards").mkdir(parents=True, exist_ok=True)
        self._clean_partials()
        S = self.shard_contexts
        missing = [i for i in range(n_shards) if not self._holds(i, min((i + 1) * S, n_ctx))]
        if missing:
            todo_tokens = sum(int(mask_CT[i * S : (i + 1) * S].sum()) for i in missing)
            with tqdm(total=todo_tokens, desc=f"activations L{self.lm.layer}", unit="tok", unit_scale=True,
                      smoothing=0.1) as bar:
                for i in missing:
                    lo, hi = i * S, min((i + 1) * S, len(cum))
                    self._extract_shard(i, ctx.token_ids_CT[lo:hi], lo, batch_contexts, bar)
                    if on_shard is not None:
                        on_shard(i)
        shards = [self.shard_dir(i) for i in range(n_shards)]
        return ShardSource(shards, limit=n_tokens)

    def _holds(self, i: int, stop_context: int) -> bool:
        """Whether shard i is there and holds every context before `stop_context`. A shard extracted when
        fewer tokens were asked for ends early (the last one ends where those tokens did); asked for more, it
        is extracted again. Served as it was, the rows after it would skip the contexts it lacks, and a
        held-out range after the training tokens (`hsae eval`) would come up short and fall back to the
        training tokens: SmolLM2's demo cache extracted for 150k training tokens ended 74 tokens later, so
        every later evaluation scored the first 10k training tokens as "held out"."""
        rows = self.shard_dir(i) / "rows.npy"
        if not rows.is_file():
            return False
        meta_N2 = np.load(rows, mmap_mode="r")
        return len(meta_N2) > 0 and int(meta_N2[-1, 0]) + 1 >= stop_context

    def _extract_shard(self, i: int, tokens_CT: np.ndarray, first_context: int, batch_contexts: int,
                       bar: tqdm) -> None:
        acts, rows = [], []
        for lo in range(0, len(tokens_CT), batch_contexts):
            chunk = tokens_CT[lo : lo + batch_contexts]
            resid_BTD, sel = extract_batch(self.lm, chunk)
            acts.append(resid_BTD)
            ctx_idx, pos = np.nonzero(sel)
            rows.append(np.stack([ctx_idx + first_context + lo, pos], axis=1).astype(np.int32))
            bar.update(len(resid_BTD))
        final = self.shard_dir(i)
        partial = final.with_name(final.name + f".partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        np.save(partial / "acts.npy", np.concatenate(acts))
        np.save(partial / "rows.npy", np.concatenate(rows))
        old = final.with_name(final.name + f".partial-old-{os.getpid()}")
        if final.exists():  # a shorter extraction of this shard: set aside (open maps stay valid), replaced
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)


def extract_batch(lm: LanguageModel, tokens_CT: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Residual stream rows [n, D] (float32) of the real text tokens of some contexts, and the mask that
    picked them. Right padding is invisible to real tokens under a causal mask, so no position ids are
    needed."""
    present = tokens_CT != PAD
    ids = torch.from_numpy(np.where(present, tokens_CT, 0).astype(np.int64))
    attention = torch.from_numpy(present.astype(np.int64))
    resid_BTD = lm.residual(ids, attention)
    sel = present.copy()
    sel[:, 0] = False
    sel_t = torch.from_numpy(sel).to(resid_BTD.device)
    return resid_BTD[sel_t].float().cpu().numpy(), sel


class ShardSource:
    """Activation rows from cache shards, memory-mapped, as an ActivationSource (see epoch_order)."""

    BLOCK_ROWS = 4096
    WINDOW_BLOCKS = 32

    def __init__(self, shard_dirs: list[Path], limit: int | None = None):
        if not shard_dirs:
            raise HSAEError("no activation shards to read")
        self.acts = [np.load(d / "acts.npy", mmap_mode="r") for d in shard_dirs]
        self.rows = [np.load(d / "rows.npy", mmap_mode="r") for d in shard_dirs]
        sizes = np.array([len(a) for a in self.acts])
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.num_rows = int(self.offsets[-1] if limit is None else min(limit, self.offsets[-1]))
        self.d_in = int(self.acts[0].shape[1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) in corpus order, as one float32 array."""
        return self._read(self.acts, start, stop).astype(np.float32, copy=False)

    def _read(self, arrays: list[np.ndarray], start: int, stop: int) -> np.ndarray:
        out = []
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        for s in range(first, len(arrays)):
            lo, hi = max(start, self.offsets[s]), min(stop, self.offsets[s + 1])
            if lo >= hi:
                break
            out.append(arrays[s][lo - self.offsets[s] : hi - self.offsets[s]])
        return np.concatenate(out)

    def read_meta(self, start: int, stop: int) -> np.ndarray:
        """(context, position) of rows [start, stop)."""
        return self._read(self.rows, start, stop)

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        """Row order of one epoch: blocks of contiguous rows in random order, shuffled within windows of
        blocks.

        This is a shuffling buffer expressed as indices: the rows a window touches lie in WINDOW_BLOCKS
        blocks, so reads stay local, while the schedule itself needs no data (a resumed run skips batches
        unread).
        """
        rng = np.random.default_rng([seed, epoch])
        n_blocks = -(-self.num_rows // self.BLOCK_ROWS)
        blocks = rng.permutation(n_blocks)
        order = []
        for w in range(0, n_blocks, self.WINDOW_BLOCKS):
            rows = np.concatenate([
                np.arange(b * self.BLOCK_ROWS, min((b + 1) * self.BLOCK_ROWS, self.num_rows))
                for b in blocks[w : w + self.WINDOW_BLOCKS]
            ])
            order.append(rows[rng.permutation(len(rows))])
        return np.concatenate(order)

    def gather(self, idx: np.ndarray) -> np.ndarray:
        """Rows at sorted global indices idx, as float32 [len(idx), D]."""
        shard_of = np.searchsorted(self.offsets, idx, side="right") - 1
        out = np.empty((len(idx), self.d_in), dtype=np.float32)
        bounds = np.searchsorted(shard_of, np.arange(len(self.acts) + 1))
        for s in range(len(self.acts)):
            lo, hi = bounds[s], bounds[s + 1]
            if lo < hi:
                out[lo:hi] = self.acts[s][idx[lo:hi] - self.offsets[s]]
        return out

    def batch_indices(self, batch_size: int, *, seed: int, start_step: int = 0) -> Iterator[np.ndarray]:
        """The sorted global row indices of each batch `batches` yields."""
        if batch_size > self.num_rows:
            raise HSAEError(f"batch size {batch_size} exceeds the {self.num_rows} rows of activations")
        per_epoch = self.num_rows // batch_size  # the ragged tail of each epoch is dropped
        epoch, skip = divmod(start_step, per_epoch)
        while True:
            order = self.epoch_order(seed, epoch)
            for b in range(skip, per_epoch):
                yield np.sort(order[b * batch_size : (b + 1) * batch_size])
            epoch, skip = epoch + 1, 0

    def batches(self, batch_size: int, *, seed: int, start_step: int = 0) -> Iterator[torch.Tensor]:
        for idx in self.batch_indices(batch_size, seed=seed, start_step=start_step):
            yield torch.from_numpy(self.gather(idx))


# ---------------------------------------------------------------------------------------------------------
# Activations given directly as a matrix


def load_activation_file(path: str | Path) -> TensorSource:
    """A float matrix [N, d] from .npy (memory-mapped) or .safetensors (tensor `activations`), checked
    finite."""
    path = Path(path)
    if not path.is_file():
        raise HSAEError(f"activations file {path} does not exist")
    if path.suffix == ".npy":
        try:
            rows = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as err:
            raise HSAEError(f"{path} is not a readable .npy file ({err})") from None
    elif path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                if "activations" not in f.keys():
                    found = ", ".join(f.keys())
                    raise HSAEError(f"{path} has no tensor named 'activations' (found: {found})")
                rows = f.get_tensor("activations")
        except SafetensorError as err:
            raise HSAEError(f"{path} is not a readable .safetensors file ({err})") from None
    else:
        raise HSAEError(f"activations file {path} must end in .npy or .safetensors")
    if rows.ndim != 2:
        raise HSAEError(f"activations in {path} must be a 2-D [N, d] matrix, got shape {tuple(rows.shape)}")
    if not np.issubdtype(rows.dtype, np.floating):
        raise HSAEError(f"activations in {path} must be floating point, got {rows.dtype}")
    if rows.shape[0] == 0 or rows.shape[1] == 0:
        raise HSAEError(f"activations in {path} are empty (shape {tuple(rows.shape)})")
    for start in range(0, rows.shape[0], 65_536):
        block = np.asarray(rows[start : start + 65_536])
        if not np.isfinite(block).all():
            bad = start + int(np.argwhere(~np.isfinite(block))[0][0])
            raise HSAEError(f"activations in {path} hold NaN or inf (first at row {bad})")
    return TensorSource(rows)
