"""Streaming, exactly mergeable per-feature statistics for the index.

The accumulator sees chunks of tokens, each as plain arrays: per level the sparse codes (indices [N, K] with
-1 for unused slots, values [N, K]) and per token its context id and position. It keeps, per feature:
fire count, sum and max of activations, a histogram on fixed log-spaced bins, the top-k contexts by the
feature's max value in the context, hash-sampled contexts per histogram bin (for Neuronpedia-style quantile
examples), and per child the number of tokens on which it and its parent are both active; and, between every
two levels, how often each pair of their features fires on the same token (the cross-width relatives, and the
parents a post-hoc tree infers when the edges are not known up front).

Every piece is a sum, a max, or a top-k under a total order, so `merge` of two accumulators that saw disjoint
contexts equals one accumulator that saw both (the test checks this exactly). That is what lets indexing be
sharded across processes or machines.

Rules: a latent is *active* on a token when its slot index is >= 0 and its value is > 0 (leaky negative values
count as inactive). Contexts are fixed-length windows with ids in [0, 2^40); all tokens of a context must come
in the same chunk, and shards must see disjoint contexts. Top-k order: max value descending, then context id
ascending. Memory is bounded by features × (top_k + quantile_examples × non-empty bins) kept contexts, plus
the feature's per-token values in those contexts (at most context_length each, usually a handful).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

CONTEXT_BITS = 40
MAX_CONTEXT_ID = 1 << CONTEXT_BITS
MAX_WIDTH = 1 << (63 - CONTEXT_BITS)
_CONTEXT_MASK = np.int64(MAX_CONTEXT_ID - 1)
_NO_POSITION = np.iinfo(np.int32).max
KIND_TOP, KIND_QUANTILE = 0, 1

Edge = tuple[tuple[int, int], tuple[int, int]]  # ((parent level, parent index), (child level, child index))


@dataclass(frozen=True)
class IndexConfig:
    """How much of each feature's activity the index keeps."""

    top_k: int = 20
    """Top-activating contexts kept per feature."""
    quantile_buckets: int = 5
    """Equal-width intervals of [0, max activation] from which lower-activation examples are shown."""
    quantile_examples: int = 3
    """Examples shown per quantile bucket; also how many hash-sampled contexts are kept per sampling bin."""
    hist_bins: int = 80
    """Log-spaced histogram bins between hist_min and hist_max (values outside go to the end bins)."""
    hist_min: float = 1e-4
    hist_max: float = 1e4
    sample_bin_width: int = 3
    """Histogram bins per sampling bin (3 of 10 per decade: a factor of 2 in activation per sampling bin)."""
    seed: int = 0
    """Seed of the hash that decides which contexts are sampled; the same seed makes merges exact."""

    def __post_init__(self) -> None:
        for name in ("top_k", "quantile_buckets", "quantile_examples", "hist_bins", "sample_bin_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"IndexConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.top_k > 10_000 or self.quantile_buckets > 1_000 or self.sample_bins > 64:
            raise ValueError("IndexConfig: need top_k <= 10000, quantile_buckets <= 1000, sample bins <= 64")
        if not 0 < self.hist_min < self.hist_max:
            raise ValueError(f"need 0 < hist_min < hist_max, got {self.hist_min}, {self.hist_max}")

    def hist_edges(self) -> np.ndarray:
        return np.geomspace(self.hist_min, self.hist_max, self.hist_bins + 1)

    @property
    def sample_bins(self) -> int:
        return -(-self.hist_bins // self.sample_bin_width)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def histogram_bins(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin of each value: [edges[i], edges[i+1]), with under- and overflow clipped into the end bins."""
    bins = np.searchsorted(edges, values.astype(np.float64), side="right") - 1
    return np.clip(bins, 0, len(edges) - 2)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def sample_priority(level: int, features: np.ndarray, contexts: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic pseudo-random int64 priority of (level, feature, context); the lowest form the sample.

    23 hash bits above the 40 context bits: distinct contexts never tie, so the order is total."""
    feature_key = (np.uint64(level) << np.uint64(32)) | np.asarray(features).astype(np.uint64)
    mixed = _splitmix64(feature_key ^ _splitmix64(np.full(1, seed, dtype=np.uint64)))
    hashed = _splitmix64(mixed ^ np.asarray(contexts).astype(np.uint64)) >> np.uint64(64 - 23)
    return (hashed.astype(np.int64) << CONTEXT_BITS) | np.asarray(contexts).astype(np.int64)


def parent_arrays(level_widths: Sequence[int], edges: Iterable[Edge]) -> list[np.ndarray]:
    """Per level, the parent index (in the level above) of each feature, -1 for none; level 0 has none."""
    parents = [np.full(w, -1, dtype=np.int64) for w in level_widths]
    for (p_level, p_idx), (c_level, c_idx) in edges:
        if c_level != p_level + 1 or not 0 <= p_level < len(level_widths) - 1:
            raise ValueError(f"edge {(p_level, p_idx)} -> {(c_level, c_idx)}: a child must be a level below")
        if not (0 <= p_idx < level_widths[p_level] and 0 <= c_idx < level_widths[c_level]):
            raise ValueError(f"edge {(p_level, p_idx)} -> {(c_level, c_idx)}: index out of range")
        if parents[c_level][c_idx] not in (-1, p_idx):
            raise ValueError(f"feature {(c_level, c_idx)} has two parents; the forest allows one")
        parents[c_level][c_idx] = p_idx
    return parents


def _to_numpy(array: Any, dtype: Any) -> np.ndarray:
    if hasattr(array, "detach"):  # a torch tensor, possibly on an accelerator
        array = array.detach().cpu().numpy()
    return np.asarray(array, dtype=dtype)


def _argsort_by(major: np.ndarray, minor: np.ndarray) -> np.ndarray:
    """Order by (major, minor), both int64: a fast unstable sort on major, then ties re-sorted by minor."""
    order = np.argsort(major)
    sorted_major = major[order]
    equal = sorted_major[1:] == sorted_major[:-1]
    tied = np.zeros(len(order), bool)
    tied[1:] |= equal
    tied[:-1] |= equal
    if tied.any():
        at = np.flatnonzero(tied)
        sub = order[at]
        order[at] = sub[np.lexsort((minor[sub], major[sub]))]
    return order


def _descending(value: np.ndarray) -> np.ndarray:
    """An int64 key that sorts positive float32 values from largest to smallest (0 sorts last)."""
    return np.int64(0x7FFFFFFF) - value.astype(np.float32).view(np.int32).astype(np.int64)


def _unique(a: np.ndarray) -> np.ndarray:
    """np.unique for integers, by sorting (numpy's hash-based unique is far slower on large int64 arrays)."""
    a = np.sort(a)
    keep = np.ones(len(a), bool)
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    return a[keep]


def _isin(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """np.isin for integers, by sorting both sides."""
    if len(b) == 0:
        return np.zeros(len(a), bool)
    b = np.sort(b)
    order = np.argsort(a)
    a_sorted = a[order]
    at = np.minimum(np.searchsorted(b, a_sorted), len(b) - 1)
    out = np.empty(len(a), bool)
    out[order] = b[at] == a_sorted
    return out


def _group_starts(sorted_keys: np.ndarray) -> np.ndarray:
    new = np.empty(len(sorted_keys), dtype=bool)
    new[:1] = True
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=new[1:])
    return np.flatnonzero(new)


def _rank_in_groups(sorted_keys: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... within each run of equal keys of a sorted array."""
    starts = _group_starts(sorted_keys)
    lengths = np.diff(np.append(starts, len(sorted_keys)))
    return np.arange(len(sorted_keys)) - np.repeat(starts, lengths)


def _gather_ranges(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """Concatenation of arange(start, stop) for each pair, without a Python loop."""
    lengths = stops - starts
    offsets = np.cumsum(lengths) - lengths
    return np.repeat(starts - offsets, lengths) + np.arange(lengths.sum())


def _pack(features: np.ndarray, contexts: np.ndarray) -> np.ndarray:
    return (features.astype(np.int64) << CONTEXT_BITS) | contexts.astype(np.int64)


@dataclass
class _Groups:
    """A chunk's active entries of one level grouped by (feature, context): the candidates for examples."""

    feature: np.ndarray
    context: np.ndarray
    max_value: np.ndarray
    max_position: np.ndarray
    starts: np.ndarray  # each group's entries are entry_*[starts[g]:stops[g]]
    stops: np.ndarray
    entry_key: np.ndarray
    entry_position: np.ndarray
    entry_value: np.ndarray

    @classmethod
    def build(cls, feature: np.ndarray, context: np.ndarray, position: np.ndarray,
              value: np.ndarray) -> _Groups:
        key = _pack(feature, context)
        order = np.argsort(key)  # order within a group does not matter
        key, position, value = key[order], position[order], value[order]
        starts = _group_starts(key)
        stops = np.append(starts[1:], len(key))
        max_value = np.maximum.reduceat(value, starts)
        group_of_entry = np.repeat(np.arange(len(starts)), stops - starts)
        at_max = value == max_value[group_of_entry]
        max_position = np.minimum.reduceat(np.where(at_max, position, _NO_POSITION), starts)
        return cls(
            feature=key[starts] >> CONTEXT_BITS,
            context=key[starts] & _CONTEXT_MASK,
            max_value=max_value,
            max_position=max_position.astype(np.int32),
            starts=starts,
            stops=stops,
            entry_key=key,
            entry_position=position.astype(np.int32),
            entry_value=value,
        )


@dataclass
class _Samples:
    """Per (feature, sampling bin), the contexts with the lowest sample priority; sorted by (fb, priority)."""

    fb: np.ndarray  # feature * sample_bins + sampling bin
    priority: np.ndarray
    context: np.ndarray
    value: np.ndarray
    position: np.ndarray

    @classmethod
    def empty(cls) -> _Samples:
        return cls(
            np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64),
            np.empty(0, np.float32), np.empty(0, np.int32),
        )

    def concat(self, other: _Samples) -> _Samples:
        pairs = zip(self._arrays(), other._arrays(), strict=True)
        return _Samples(*(np.concatenate([a, b]) for a, b in pairs))

    def _arrays(self) -> tuple[np.ndarray, ...]:
        return (self.fb, self.priority, self.context, self.value, self.position)

    def take(self, rows: np.ndarray) -> _Samples:
        return _Samples(*(a[rows] for a in self._arrays()))

    def bottom(self, per_group: int) -> tuple[_Samples, np.ndarray]:
        """The `per_group` lowest-priority rows of each fb group (sorted), and which input rows they are."""
        # fb < 2^29 and priority < 2^63: the major key keeps fb and the priority's top 34 bits.
        order = _argsort_by((self.fb << 34) | (self.priority >> 29), self.priority)
        rows = order[_rank_in_groups(self.fb[order]) < per_group]
        return self.take(rows), rows


class _LevelState:
    def __init__(self, level: int, width: int, parent: np.ndarray, config: IndexConfig):
        self.level, self.width, self.parent, self.config = level, width, parent, config
        self.fire_count = np.zeros(width, np.int64)
        self.act_sum = np.zeros(width, np.float64)
        self.act_max = np.zeros(width, np.float32)
        self.hist = np.zeros((width, config.hist_bins), np.int64)
        self.coactive = np.zeros(width, np.int64)  # tokens where the feature and its parent are both active
        k = config.top_k
        self.top_context = np.full((width, k), -1, np.int64)  # -1: empty slot
        self.top_value = np.zeros((width, k), np.float32)
        self.top_position = np.zeros((width, k), np.int32)
        self.samples = _Samples.empty()
        # The feature's per-token values in every kept context, keyed by (feature << 40 | context).
        self.entry_key = np.empty(0, np.int64)
        self.entry_position = np.empty(0, np.int32)
        self.entry_value = np.empty(0, np.float32)
        self._entries_after_compaction = 0

    # -- one chunk ---------------------------------------------------------------------------------------
    def add(self, feature: np.ndarray, value: np.ndarray, context: np.ndarray, position: np.ndarray,
            edges: np.ndarray) -> None:
        self.fire_count += np.bincount(feature, minlength=self.width)
        self.act_sum += np.bincount(feature, weights=value.astype(np.float64), minlength=self.width)
        np.maximum.at(self.act_max, feature, value)
        bins = histogram_bins(value, edges)
        cells = np.sort(feature * self.config.hist_bins + bins)
        starts = _group_starts(cells)
        self.hist.reshape(-1)[cells[starts]] += np.diff(np.append(starts, len(cells)))

        groups = _Groups.build(feature, context, position, value)
        entered_top = self._offer_top(groups.feature, groups.context, groups.max_value, groups.max_position)
        sample_bins = histogram_bins(groups.max_value, edges) // self.config.sample_bin_width
        entered_samples = self._offer_samples(groups, sample_bins)
        kept = _unique(np.concatenate([entered_top, entered_samples]))
        rows = _gather_ranges(groups.starts[kept], groups.stops[kept])
        self._append_entries(groups.entry_key[rows], groups.entry_position[rows], groups.entry_value[rows])

    def _offer_top(self, feature: np.ndarray, context: np.ndarray, value: np.ndarray,
                   position: np.ndarray) -> np.ndarray:
        """Merge candidate (feature, context) maxima into the top-k; return the candidates that got in."""
        last_context, last_value = self.top_context[feature, -1], self.top_value[feature, -1]
        beats = (last_context < 0) | (value > last_value) | ((value == last_value) & (context < last_context))
        cand = np.flatnonzero(beats)
        if cand.size == 0:
            return cand
        touched = _unique(feature[cand])
        held = self.top_context[touched].reshape(-1) >= 0
        k = self.config.top_k
        all_feature = np.concatenate([np.repeat(touched, k)[held], feature[cand]])
        all_context = np.concatenate([self.top_context[touched].reshape(-1)[held], context[cand]])
        all_value = np.concatenate([self.top_value[touched].reshape(-1)[held], value[cand]])
        all_position = np.concatenate([self.top_position[touched].reshape(-1)[held], position[cand]])
        source = np.concatenate([np.full(int(held.sum()), -1), cand])
        order = _argsort_by((all_feature << 31) | _descending(all_value), all_context)
        rank = _rank_in_groups(all_feature[order])
        order, rank = order[rank < k], rank[rank < k]
        self.top_context[touched] = -1
        self.top_value[touched] = 0
        self.top_position[touched] = 0
        f = all_feature[order]
        self.top_context[f, rank] = all_context[order]
        self.top_value[f, rank] = all_value[order]
        self.top_position[f, rank] = all_position[order]
        entered = source[order]
        return entered[entered >= 0]

    def _offer_samples(self, groups: _Groups, bins: np.ndarray) -> np.ndarray:
        q = self.config.quantile_examples
        fb = groups.feature * self.config.sample_bins + bins
        priority = sample_priority(self.level, groups.feature, groups.context, self.config.seed)
        held = self.samples
        if held.fb.size:  # skip candidates that cannot displace a full group's worst sample
            lo = np.searchsorted(held.fb, fb, side="left")
            hi = np.searchsorted(held.fb, fb, side="right")
            worst = np.maximum(hi - 1, 0)
            cand = np.flatnonzero((hi - lo < q) | (priority < held.priority[worst]))
        else:
            cand = np.arange(len(fb))
        if cand.size == 0:
            return cand
        offered = _Samples(fb[cand], priority[cand], groups.context[cand], groups.max_value[cand],
                           groups.max_position[cand])
        self.samples, rows = held.concat(offered).bottom(q)
        return cand[rows[rows >= len(held.fb)] - len(held.fb)]

    def _append_entries(self, key: np.ndarray, position: np.ndarray, value: np.ndarray) -> None:
        self.entry_key = np.concatenate([self.entry_key, key])
        self.entry_position = np.concatenate([self.entry_position, position])
        self.entry_value = np.concatenate([self.entry_value, value])
        if len(self.entry_key) > 2 * self._entries_after_compaction + 65536:
            self._compact_entries()

    def kept_keys(self) -> np.ndarray:
        held = self.top_context >= 0
        top = _pack(np.nonzero(held)[0], self.top_context[held])
        sampled = _pack(self.samples.fb // self.config.sample_bins, self.samples.context)
        return _unique(np.concatenate([top, sampled]))

    def _compact_entries(self) -> None:
        """Drop the per-token values of contexts that no longer hold a top or sample slot."""
        keep = _isin(self.entry_key, self.kept_keys())
        self.entry_key, self.entry_position, self.entry_value = (
            self.entry_key[keep], self.entry_position[keep], self.entry_value[keep])
        self._entries_after_compaction = len(self.entry_key)

    # -- merging -----------------------------------------------------------------------------------------
    def merge(self, other: _LevelState) -> None:
        self.fire_count += other.fire_count
        self.act_sum += other.act_sum
        np.maximum(self.act_max, other.act_max, out=self.act_max)
        self.hist += other.hist
        self.coactive += other.coactive

        context = np.concatenate([self.top_context, other.top_context], axis=1)
        value = np.concatenate([self.top_value, other.top_value], axis=1)
        position = np.concatenate([self.top_position, other.top_position], axis=1)
        held = context >= 0
        if len(_unique(_pack(np.nonzero(held)[0], context[held]))) < held.sum():
            raise ValueError("both accumulators saw the same context; shards must index disjoint contexts")
        # Empty slots (value 0, context -1) sort after every real one: real values are > 0.
        order = np.lexsort((np.where(held, context, MAX_CONTEXT_ID), -value), axis=1)[:, : self.config.top_k]
        self.top_context = np.take_along_axis(context, order, axis=1)
        self.top_value = np.take_along_axis(value, order, axis=1)
        self.top_position = np.take_along_axis(position, order, axis=1)

        self.samples, _ = self.samples.concat(other.samples).bottom(self.config.quantile_examples)
        self._append_entries(other.entry_key, other.entry_position, other.entry_value)
        self._compact_entries()

    # -- final view --------------------------------------------------------------------------------------
    def finish(self) -> LevelIndex:
        self._compact_entries()
        q, nb = self.config.quantile_examples, self.config.quantile_buckets
        held = self.top_context >= 0
        top_feature, top_rank = np.nonzero(held)
        if len(_unique(_pack(top_feature, self.top_context[held]))) < len(top_feature):
            raise ValueError("a context was added in more than one chunk; add each context's tokens together")

        s = self.samples
        s_feature = s.fb // self.config.sample_bins
        not_top = ~_isin(_pack(s_feature, s.context), _pack(top_feature, self.top_context[held]))
        s, s_feature = s.take(np.flatnonzero(not_top)), s_feature[not_top]
        fraction = s.value.astype(np.float64) / self.act_max[s_feature].astype(np.float64)
        bucket = np.minimum((fraction * nb).astype(np.int64), nb - 1)
        # Within a (feature, bucket): the q lowest priorities are the sample; show them by value.
        fbk = s_feature * nb + bucket
        order = _argsort_by(fbk, s.priority)
        order = order[_rank_in_groups(fbk[order]) < q]
        order = order[_argsort_by((fbk[order] << 31) | _descending(s.value[order]), s.context[order])]
        q_rank = _rank_in_groups(fbk[order])

        n_top, n_q = len(top_feature), len(order)
        examples = ExampleArrays(
            feature=np.concatenate([top_feature, s_feature[order]]),
            kind=np.concatenate([np.full(n_top, KIND_TOP), np.full(n_q, KIND_QUANTILE)]).astype(np.int8),
            bucket=np.concatenate([np.zeros(n_top, np.int64), bucket[order]]),
            rank=np.concatenate([top_rank, q_rank]),
            context=np.concatenate([self.top_context[held], s.context[order]]),
            max_value=np.concatenate([self.top_value[held], s.value[order]]),
            max_position=np.concatenate([self.top_position[held], s.position[order]]),
        )
        group = (examples.feature * 2 + examples.kind) * nb + examples.bucket
        sort = np.argsort(group * 2**20 + examples.rank)
        entry_order = _argsort_by(self.entry_key, self.entry_position.astype(np.int64))
        return LevelIndex(
            level=self.level,
            width=self.width,
            parent=self.parent.copy(),
            fire_count=self.fire_count.copy(),
            act_sum=self.act_sum.copy(),
            act_max=self.act_max.copy(),
            hist=self.hist.copy(),
            coactive=self.coactive.copy(),
            examples=examples.take(sort),
            entry_key=self.entry_key[entry_order],
            entry_position=self.entry_position[entry_order],
            entry_value=self.entry_value[entry_order],
        )


PAIR_BLOCK = 1 << 22  # (token, slot, slot) triples expanded at once when counting co-firing pairs
DENSE_PAIRS_MAX = 1 << 24  # pairs of two levels counted in a dense int32 table (64 MB) up to this many


@dataclass
class PairCounts:
    """Counts of tokens on which feature a of an upper level and feature b of a lower one both fire, read as
    sorted unique keys a·width_b + b and their counts. Counted in a dense table (torch's index_add, as
    trainer.coactivation.CoFiring does) while width_a·width_b <= DENSE_PAIRS_MAX; beyond, chunks of sparse
    counts are buffered and folded together now and then, so that adding a chunk does not re-sort everything
    counted so far."""

    width_b: int
    width_a: int | None = None  # known: dense counting when small enough
    keys: np.ndarray = dataclasses.field(default_factory=lambda: np.empty(0, np.int64))
    counts: np.ndarray = dataclasses.field(default_factory=lambda: np.empty(0, np.int64))
    _pending: list = dataclasses.field(default_factory=list)
    _pending_rows: int = 0
    _dense: Any = None
    _dense_dirty: bool = False

    def __post_init__(self) -> None:
        if self.width_a is not None and self.width_a * self.width_b <= DENSE_PAIRS_MAX:
            import torch  # the trainer's dependency; only for the dense table

            self._dense = torch.zeros(self.width_a * self.width_b, dtype=torch.int32)

    def add(self, upper_NK: np.ndarray, lower_NJ: np.ndarray) -> None:
        """Indices [N, K] and [N, J] of two levels' active features (-1: slot unused)."""
        k, j = upper_NK.shape[1], lower_NJ.shape[1]
        step = max(1, PAIR_BLOCK // max(k * j, 1))
        for lo in range(0, len(upper_NK), step):
            up, low = upper_NK[lo : lo + step, :, None], lower_NJ[lo : lo + step, None, :]
            keys = (up * self.width_b + low)[(up >= 0) & (low >= 0)]
            if not keys.size:
                continue
            if self._dense is not None:
                import torch

                index = torch.from_numpy(keys)
                self._dense.index_add_(0, index, torch.ones(len(keys), dtype=torch.int32))
                self._dense_dirty = True
                continue
            keys = np.sort(keys)
            starts = _group_starts(keys)
            self._pending.append((keys[starts], np.diff(np.append(starts, len(keys)))))
            self._pending_rows += len(starts)
        if self._pending_rows > 2 * len(self.keys) + (1 << 20):
            self.fold()

    def merge(self, other: PairCounts) -> None:
        if self._dense is not None and other._dense is not None:
            self._dense += other._dense
            self._dense_dirty = True
            return
        other.fold()
        self._pending.append((other.keys, other.counts))
        self._pending_rows += len(other.keys)
        self.fold()

    def fold(self) -> PairCounts:
        if self._dense is not None:
            if self._dense_dirty:
                dense = self._dense.numpy()
                self.keys = np.flatnonzero(dense).astype(np.int64)
                self.counts = dense[self.keys].astype(np.int64)
                self._dense_dirty = False
            return self
        if self._pending:
            keys = np.concatenate([self.keys] + [k for k, _ in self._pending])
            counts = np.concatenate([self.counts] + [c for _, c in self._pending])
            order = np.argsort(keys, kind="stable")
            keys, counts = keys[order], counts[order]
            starts = _group_starts(keys)
            self.keys, self.counts = keys[starts], np.add.reduceat(counts, starts) if len(keys) else counts
            self._pending, self._pending_rows = [], 0
        return self

    def count(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Co-firing tokens of each (a, b) pair."""
        self.fold()
        want = np.asarray(a, np.int64) * self.width_b + np.asarray(b, np.int64)
        if len(self.keys) == 0:
            return np.zeros(len(want), np.int64)
        at = np.minimum(np.searchsorted(self.keys, want), len(self.keys) - 1)
        return np.where(self.keys[at] == want, self.counts[at], 0)

    def best_upper(self, width_a: int) -> tuple[np.ndarray, np.ndarray]:
        """Per lower feature b: the upper feature it co-fires with most (ties: lowest index; -1 if none) and
        that count (0 if none); what `trainer.coactivation.CoFiring.best_parents` gives, from these counts."""
        self.fold()
        a, b = self.keys // self.width_b, self.keys % self.width_b
        order = np.lexsort((a, -self.counts, b))
        first = order[_group_starts(b[order])] if len(order) else order
        best = np.full(self.width_b, -1, np.int64)
        count = np.zeros(self.width_b, np.int64)
        best[b[first]] = a[first]
        count[b[first]] = self.counts[first]
        return best, count


@dataclass(frozen=True)
class ExampleArrays:
    """Example rows of one level, sorted by (feature, kind, bucket, rank)."""

    feature: np.ndarray
    kind: np.ndarray  # KIND_TOP or KIND_QUANTILE
    bucket: np.ndarray  # 0 for top; quantile bucket b covers [b, b+1) / quantile_buckets × max_act
    rank: np.ndarray
    context: np.ndarray
    max_value: np.ndarray
    max_position: np.ndarray

    def take(self, rows: np.ndarray | slice) -> ExampleArrays:
        return ExampleArrays(**{f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)})

    def __len__(self) -> int:
        return len(self.feature)


@dataclass(frozen=True)
class LevelIndex:
    """Everything the index keeps about one level, as arrays indexed by feature."""

    level: int
    width: int
    parent: np.ndarray  # int64 [W], -1: no parent
    fire_count: np.ndarray  # int64 [W]
    act_sum: np.ndarray  # float64 [W]
    act_max: np.ndarray  # float32 [W]
    hist: np.ndarray  # int64 [W, hist_bins]
    coactive: np.ndarray  # int64 [W], tokens where the feature and its parent are both active
    examples: ExampleArrays
    entry_key: np.ndarray  # sorted (feature << 40 | context) of per-token values
    entry_position: np.ndarray
    entry_value: np.ndarray

    def mean_act(self) -> np.ndarray:
        return np.where(self.fire_count > 0, self.act_sum / np.maximum(self.fire_count, 1), 0.0)

    def token_values(self, rows: np.ndarray | slice, context_length: int) -> np.ndarray:
        """Dense float32 [R, context_length] values of each example's feature on each token of its context."""
        ex = self.examples.take(rows)
        keys = _pack(ex.feature, ex.context)
        lo = np.searchsorted(self.entry_key, keys, side="left")
        hi = np.searchsorted(self.entry_key, keys, side="right")
        entries = _gather_ranges(lo, hi)
        out = np.zeros((len(keys), context_length), np.float32)
        positions = self.entry_position[entries]
        if positions.size and positions.max() >= context_length:
            raise ValueError(f"token position {positions.max()} is beyond context length {context_length}")
        out[np.repeat(np.arange(len(keys)), hi - lo), positions] = self.entry_value[entries]
        return out


@dataclass(frozen=True)
class EdgeArrays:
    """One row per parent → child edge; a probability is NaN where the conditioning feature never fired."""

    parent_level: np.ndarray
    parent_idx: np.ndarray
    child_level: np.ndarray
    child_idx: np.ndarray
    coactive: np.ndarray
    p_parent_given_child: np.ndarray
    p_child_given_parent: np.ndarray

    def __len__(self) -> int:
        return len(self.child_idx)


@dataclass(frozen=True)
class RelativeArrays:
    """One row per (feature, relative): a feature of another level among the `rank`-th it co-fires with most
    (by co-firing tokens; ties: lowest index), with P(relative | feature) and P(feature | relative)."""

    level: np.ndarray
    idx: np.ndarray
    rel_level: np.ndarray
    rel_idx: np.ndarray
    rank: np.ndarray  # 0.. within (feature, rel_level)
    coactive: np.ndarray
    p_relative_given_feature: np.ndarray
    p_feature_given_relative: np.ndarray

    def __len__(self) -> int:
        return len(self.idx)


RELATIVES_PER_LEVEL = 5


@dataclass(frozen=True)
class IndexResult:
    level_widths: tuple[int, ...]
    config: IndexConfig
    n_tokens: int
    levels: list[LevelIndex]
    pairs: dict[tuple[int, int], PairCounts] = dataclasses.field(default_factory=dict)
    """(upper level, lower level) → co-firing counts of their features, for every two levels."""

    def relatives(self, per_level: int = RELATIVES_PER_LEVEL) -> RelativeArrays:
        """Each feature's `per_level` most co-firing features of every other level."""
        parts = []
        for (upper, lower), pc in sorted(self.pairs.items()):
            pc.fold()
            a, b = pc.keys // pc.width_b, pc.keys % pc.width_b
            fires_a = self.levels[upper].fire_count[a].astype(np.float64)
            fires_b = self.levels[lower].fire_count[b].astype(np.float64)
            for own, other, own_level, other_level, own_fires, other_fires in (
                (a, b, upper, lower, fires_a, fires_b), (b, a, lower, upper, fires_b, fires_a)
            ):
                order = np.lexsort((other, -pc.counts, own))
                rank = _rank_in_groups(own[order])
                order, rank = order[rank < per_level], rank[rank < per_level]
                n = len(order)
                parts.append((np.full(n, own_level), own[order], np.full(n, other_level), other[order], rank,
                               pc.counts[order], pc.counts[order] / own_fires[order],
                               pc.counts[order] / other_fires[order]))
        if not parts:
            empty_i, empty_f = np.empty(0, np.int64), np.empty(0, np.float64)
            return RelativeArrays(*([empty_i] * 6), empty_f, empty_f)
        cols = [np.concatenate(c) for c in zip(*parts, strict=True)]
        order = np.lexsort((cols[4], cols[2], cols[1], cols[0]))
        return RelativeArrays(*(c[order] for c in cols))

    def density(self, level: int) -> np.ndarray:
        return self.levels[level].fire_count / max(self.n_tokens, 1)

    def child_count(self, level: int) -> np.ndarray:
        if level + 1 >= len(self.levels):
            return np.zeros(self.level_widths[level], np.int64)
        parent = self.levels[level + 1].parent
        return np.bincount(parent[parent >= 0], minlength=self.level_widths[level])

    def edges(self) -> EdgeArrays:
        parts = []
        for lv in self.levels[1:]:
            child = np.flatnonzero(lv.parent >= 0)
            parent = lv.parent[child]
            child_fires = lv.fire_count[child].astype(np.float64)
            parent_fires = self.levels[lv.level - 1].fire_count[parent].astype(np.float64)
            both = lv.coactive[child]
            with np.errstate(divide="ignore", invalid="ignore"):
                p_pc = np.where(child_fires > 0, both / child_fires, np.nan)
                p_cp = np.where(parent_fires > 0, both / parent_fires, np.nan)
            parts.append((np.full(len(child), lv.level - 1), parent, np.full(len(child), lv.level), child,
                          both, p_pc, p_cp))
        if not parts:
            empty_i, empty_f = np.empty(0, np.int64), np.empty(0, np.float64)
            return EdgeArrays(empty_i, empty_i, empty_i, empty_i, empty_i, empty_f, empty_f)
        return EdgeArrays(*(np.concatenate(cols) for cols in zip(*parts, strict=True)))

    def context_ids(self) -> np.ndarray:
        """Sorted ids of every context some example shows."""
        return _unique(np.concatenate([lv.examples.context for lv in self.levels]))


class IndexAccumulator:
    """Per-run streaming statistics; `add` chunks, `merge` shards, `result` at the end."""

    def __init__(self, level_widths: Sequence[int], edges: Iterable[Edge] = (),
                 config: IndexConfig | None = None):
        self.level_widths = tuple(int(w) for w in level_widths)
        if not self.level_widths or min(self.level_widths) < 1 or max(self.level_widths) >= MAX_WIDTH:
            raise ValueError(f"level widths must be in [1, {MAX_WIDTH}), got {self.level_widths}")
        self.config = config or IndexConfig()
        self._hist_edges = self.config.hist_edges()
        self.parents = parent_arrays(self.level_widths, edges)
        self._levels = [
            _LevelState(level, width, parent, self.config)
            for level, (width, parent) in enumerate(zip(self.level_widths, self.parents, strict=True))
        ]
        self.pairs = {
            (a, b): PairCounts(self.level_widths[b], self.level_widths[a])
            for a in range(len(self.level_widths)) for b in range(a + 1, len(self.level_widths))
        }
        self.n_tokens = 0

    def add(self, codes: Sequence[tuple[Any, Any]], context_ids: Any, positions: Any) -> None:
        """One chunk: per level (indices [N, K] int, -1 unused; values [N, K] float), and per token its
        context id [N] and position in the context [N]. numpy arrays or torch tensors (any device)."""
        if len(codes) != len(self.level_widths):
            raise ValueError(f"expected codes for {len(self.level_widths)} levels, got {len(codes)}")
        context_N = _to_numpy(context_ids, np.int64).reshape(-1)
        position_N = _to_numpy(positions, np.int64).reshape(-1)
        n = len(context_N)
        if len(position_N) != n:
            raise ValueError(f"{n} context ids but {len(position_N)} positions")
        if n and (context_N.min() < 0 or context_N.max() >= MAX_CONTEXT_ID):
            raise ValueError(f"context ids must be in [0, 2^{CONTEXT_BITS})")
        if n and (position_N.min() < 0 or position_N.max() >= _NO_POSITION):
            raise ValueError("token positions must be >= 0")

        above: tuple[np.ndarray, np.ndarray] | None = None  # the level above's active (token, feature)
        active_indices: list[np.ndarray] = []  # per level [N, K], -1 where not active
        for state, (indices, values) in zip(self._levels, codes, strict=True):
            indices_NK = _to_numpy(indices, np.int64)
            values_NK = _to_numpy(values, np.float32)
            if indices_NK.ndim != 2 or indices_NK.shape != values_NK.shape or len(indices_NK) != n:
                raise ValueError(
                    f"level {state.level}: indices {indices_NK.shape} and values {values_NK.shape} must both"
                    f" be [N={n}, K]"
                )
            active = (indices_NK >= 0) & (values_NK > 0)
            token, _slot = np.nonzero(active)
            feature, value = indices_NK[active], values_NK[active]
            if feature.size and feature.max() >= state.width:
                raise ValueError(f"level {state.level}: feature index {feature.max()} >= width {state.width}")
            if not np.isfinite(value).all():
                raise ValueError(f"level {state.level}: non-finite activation values")
            if feature.size:
                state.add(feature, value, context_N[token], position_N[token], self._hist_edges)
                if above is not None:
                    state.coactive += self._coactive(state, token, feature, above)
            above = (token, feature)
            active_indices.append(np.where(active, indices_NK, -1))
        for (a, b), pc in self.pairs.items():
            pc.add(active_indices[a], active_indices[b])
        self.n_tokens += n

    def fire_count(self, level: int) -> np.ndarray:
        """Tokens seen so far on which each feature of `level` was active."""
        return self._levels[level].fire_count.copy()

    def set_parents(self, level: int, parent: np.ndarray) -> None:
        """Give the features of `level` (>= 1) these parents in the level above (-1: none), after the codes
        were seen: their co-firing counts come from the pair counts, exactly what `add` would have counted.
        For trees inferred from the indexed tokens themselves (a post-hoc tree of flat SAEs)."""
        state = self._levels[level]
        parent = np.asarray(parent, np.int64)
        if not 1 <= level < len(self._levels) or parent.shape != (state.width,):
            raise ValueError(f"set_parents: level {level} needs one parent per feature")
        if parent.size and (parent.max() >= self.level_widths[level - 1] or parent.min() < -1):
            raise ValueError(f"set_parents: a parent index is out of range for level {level - 1}")
        has = parent >= 0
        coactive = np.zeros(state.width, np.int64)
        coactive[has] = self.pairs[(level - 1, level)].count(parent[has], np.flatnonzero(has))
        state.parent[:] = parent
        state.coactive[:] = coactive
        self.parents[level] = state.parent

    def _coactive(self, state: _LevelState, token: np.ndarray, feature: np.ndarray,
                  above: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """Per child feature, the chunk's tokens on which its parent is active too."""
        width_above = self.level_widths[state.level - 1]
        parent = state.parent[feature]
        has_parent = parent >= 0
        wanted = token[has_parent] * width_above + parent[has_parent]
        found = _isin(wanted, above[0] * width_above + above[1])
        return np.bincount(feature[has_parent][found], minlength=state.width)

    def merge(self, other: IndexAccumulator) -> IndexAccumulator:
        """Fold in an accumulator that saw other contexts with the same widths, edges and config."""
        if (other.level_widths, other.config) != (self.level_widths, self.config) or not all(
            np.array_equal(a, b) for a, b in zip(self.parents, other.parents, strict=True)
        ):
            raise ValueError("can only merge accumulators with the same level widths, edges and config")
        for mine, theirs in zip(self._levels, other._levels, strict=True):
            mine.merge(theirs)
        for key, pc in self.pairs.items():
            pc.merge(other.pairs[key])
        self.n_tokens += other.n_tokens
        return self

    def kept_context_ids(self) -> np.ndarray:
        """Contexts that may still be shown; a context store may forget every other one."""
        ids = [lv.kept_keys() & _CONTEXT_MASK for lv in self._levels]
        return _unique(np.concatenate(ids))

    def result(self) -> IndexResult:
        levels = [lv.finish() for lv in self._levels]
        pairs = {key: pc.fold() for key, pc in self.pairs.items()}
        return IndexResult(self.level_widths, self.config, self.n_tokens, levels, pairs)
