"""The index accumulator against a brute-force oracle written with plain Python loops, and merge exactness."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from trainer.index import (
    ContextStore,
    IndexAccumulator,
    IndexConfig,
    accumulate,
    decoder_cosines,
    top_output_tokens,
)
from trainer.index.accumulate import KIND_QUANTILE, KIND_TOP, sample_priority

# Ties, negatives (inactive), zeros (inactive), and values beyond both ends of the histogram range.
VALUES = np.array([0.25, 0.5, 0.5, 1.0, 1.0, 1.5, 2.0, 3.0, 7.0, -0.5, 0.0, 3e-5, 2e4], np.float32)


@dataclass
class Corpus:
    widths: tuple[int, ...]
    edges: list
    codes: list[tuple[np.ndarray, np.ndarray]]  # per level, over all N tokens
    context: np.ndarray  # [N]
    position: np.ndarray  # [N]
    n_contexts: int


def make_corpus(seed: int, n_contexts: int = 14, length: int = 5, widths=(3, 6, 12), ks=(2, 3, 3)) -> Corpus:
    rng = np.random.default_rng(seed)
    n = n_contexts * length
    edges = []
    for level in range(1, len(widths)):
        for child in range(widths[level]):
            if child % 5 != 4:  # some children stay unassigned, as in the Tree HSAE
                edges.append(((level - 1, child % widths[level - 1]), (level, child)))
    codes = []
    for width, k in zip(widths, ks, strict=True):
        indices = np.stack([rng.permutation(width)[:k] for _ in range(n)]).astype(np.int64)
        indices[rng.random((n, k)) < 0.2] = -1
        values = rng.choice(VALUES, size=(n, k)).astype(np.float32)
        codes.append((indices, values))
    context = np.repeat(np.arange(n_contexts) * 7 + 3, length)  # sparse, non-contiguous ids
    position = np.tile(np.arange(length), n_contexts)
    return Corpus(tuple(widths), edges, codes, context, position, n_contexts)


def feed(acc: IndexAccumulator, corpus: Corpus, contexts: np.ndarray, per_chunk: int, seed: int = 0) -> None:
    """Feed the tokens of `contexts` in chunks of whole contexts, tokens shuffled inside each chunk."""
    rng = np.random.default_rng(seed)
    for start in range(0, len(contexts), per_chunk):
        rows = np.flatnonzero(np.isin(corpus.context, contexts[start : start + per_chunk]))
        rows = rng.permutation(rows)
        acc.add([(i[rows], v[rows]) for i, v in corpus.codes], corpus.context[rows], corpus.position[rows])


def brute_force(corpus: Corpus, cfg: IndexConfig) -> dict:
    """Everything the index should hold, computed token by token."""
    edges = cfg.hist_edges()
    parent_of = [dict() for _ in corpus.widths]
    for (_pl, pi), (cl, ci) in corpus.edges:
        parent_of[cl][ci] = pi
    acts = []  # per level: feature -> {(context, position): value}
    for indices, values in corpus.codes:
        level_acts = defaultdict(dict)
        for n in range(len(indices)):
            for f, v in zip(indices[n], values[n], strict=True):
                if f >= 0 and v > 0:
                    level_acts[int(f)][(int(corpus.context[n]), int(corpus.position[n]))] = float(v)
        acts.append(level_acts)

    def hist_bin(v: float) -> int:
        v = min(max(v, edges[0]), edges[-1])
        return max(i for i in range(cfg.hist_bins) if edges[i] <= v)

    out = []
    for level, width in enumerate(corpus.widths):
        stats = {"fire": [], "sum": [], "max": [], "hist": [], "coactive": [], "examples": [], "values": {}}
        for f in range(width):
            tokens = acts[level].get(f, {})
            vals = list(tokens.values())
            stats["fire"].append(len(vals))
            stats["sum"].append(sum(vals))
            stats["max"].append(max(vals, default=0.0))
            clipped = np.clip(np.array(vals, np.float64), edges[0], edges[-1])
            stats["hist"].append(np.histogram(clipped, bins=edges)[0])
            parent = parent_of[level].get(f)
            above = acts[level - 1].get(parent, {}) if parent is not None else {}
            stats["coactive"].append(sum(1 for t in tokens if t in above))

            per_context: dict[int, list[tuple[int, float]]] = defaultdict(list)
            for (c, p), v in tokens.items():
                per_context[c].append((p, v))
            cmax = {c: max(v for _, v in pv) for c, pv in per_context.items()}
            cpos = {c: min(p for p, v in pv if v == cmax[c]) for c, pv in per_context.items()}
            for c, pv in per_context.items():
                stats["values"][(f, c)] = dict(pv)
            top = sorted(cmax, key=lambda c: (-cmax[c], c))[: cfg.top_k]
            for rank, c in enumerate(top):
                stats["examples"].append((f, KIND_TOP, 0, rank, c, cmax[c], cpos[c]))

            def prio(c: int, level: int = level, f: int = f) -> int:
                return int(sample_priority(level, np.array([f]), np.array([c]), cfg.seed)[0])

            by_bin = defaultdict(list)
            for c in cmax:
                by_bin[hist_bin(cmax[c]) // cfg.sample_bin_width].append(c)
            sampled = [c for cs in by_bin.values() for c in sorted(cs, key=prio)[: cfg.quantile_examples]]
            by_bucket = defaultdict(list)
            n_buckets = cfg.quantile_buckets
            for c in sampled:
                if c not in top:
                    by_bucket[min(int(cmax[c] / stats["max"][f] * n_buckets), n_buckets - 1)].append(c)
            for bucket in sorted(by_bucket):
                chosen = sorted(by_bucket[bucket], key=prio)[: cfg.quantile_examples]
                for rank, c in enumerate(sorted(chosen, key=lambda c: (-cmax[c], c))):
                    stats["examples"].append((f, KIND_QUANTILE, bucket, rank, c, cmax[c], cpos[c]))
        out.append(stats)
    return {"levels": out, "n_tokens": len(corpus.context)}


def assert_matches_brute_force(corpus: Corpus, cfg: IndexConfig, result) -> None:
    expected = brute_force(corpus, cfg)
    assert result.n_tokens == expected["n_tokens"]
    length = int(corpus.position.max()) + 1
    for lv, exp in zip(result.levels, expected["levels"], strict=True):
        np.testing.assert_array_equal(lv.fire_count, exp["fire"])
        np.testing.assert_allclose(lv.act_sum, exp["sum"], rtol=1e-12)
        np.testing.assert_array_equal(lv.act_max, np.array(exp["max"], np.float32))
        np.testing.assert_array_equal(lv.hist, np.stack(exp["hist"]))
        np.testing.assert_array_equal(lv.coactive[lv.parent >= 0], np.array(exp["coactive"])[lv.parent >= 0])
        ex = lv.examples
        got = [
            (int(ex.feature[j]), int(ex.kind[j]), int(ex.bucket[j]), int(ex.rank[j]), int(ex.context[j]),
             float(ex.max_value[j]), int(ex.max_position[j]))
            for j in range(len(ex))
        ]
        assert got == exp["examples"]
        dense = lv.token_values(slice(None), length)
        for j, (f, *_rest) in enumerate(got):
            want = np.zeros(length, np.float32)
            for p, v in exp["values"][(f, got[j][4])].items():
                want[p] = v
            np.testing.assert_array_equal(dense[j], want)
        np.testing.assert_allclose(result.density(lv.level), np.array(exp["fire"]) / expected["n_tokens"])


SMALL = IndexConfig(top_k=3, quantile_buckets=3, quantile_examples=2, hist_bins=16, hist_min=1e-2,
                    hist_max=1e2, sample_bin_width=2, seed=5)


@pytest.mark.parametrize("per_chunk", [1, 4, 14])
def test_matches_brute_force(per_chunk):
    corpus = make_corpus(seed=1)
    acc = IndexAccumulator(corpus.widths, corpus.edges, SMALL)
    feed(acc, corpus, np.unique(corpus.context), per_chunk)
    assert_matches_brute_force(corpus, SMALL, acc.result())


def test_edges_give_conditional_probabilities():
    corpus = make_corpus(seed=2)
    acc = IndexAccumulator(corpus.widths, corpus.edges, SMALL)
    feed(acc, corpus, np.unique(corpus.context), 3)
    result = acc.result()
    e = result.edges()
    assert len(e) == len(corpus.edges)
    expected = brute_force(corpus, SMALL)["levels"]
    for j in range(len(e)):
        child = expected[e.child_level[j]]
        parent_fire = expected[e.parent_level[j]]["fire"][e.parent_idx[j]]
        both, child_fire = child["coactive"][e.child_idx[j]], child["fire"][e.child_idx[j]]
        assert e.coactive[j] == both
        assert e.p_parent_given_child[j] == pytest.approx(both / child_fire) if child_fire else np.isnan(
            e.p_parent_given_child[j])
        assert e.p_child_given_parent[j] == pytest.approx(both / parent_fire) if parent_fire else np.isnan(
            e.p_child_given_parent[j])
    np.testing.assert_array_equal(result.child_count(0), np.bincount(
        [p for (pl, p), _ in corpus.edges if pl == 0], minlength=corpus.widths[0]))


def _assert_results_equal(a, b) -> None:
    assert a.n_tokens == b.n_tokens
    for x, y in zip(a.levels, b.levels, strict=True):
        for name in ("fire_count", "act_max", "hist", "coactive", "entry_key", "entry_position",
                     "entry_value"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name), err_msg=name)
        np.testing.assert_allclose(x.act_sum, y.act_sum, rtol=1e-12)
        for name in ("feature", "kind", "bucket", "rank", "context", "max_value", "max_position"):
            np.testing.assert_array_equal(getattr(x.examples, name), getattr(y.examples, name), err_msg=name)
    assert a.pairs.keys() == b.pairs.keys()
    for key in a.pairs:
        np.testing.assert_array_equal(a.pairs[key].keys, b.pairs[key].keys)
        np.testing.assert_array_equal(a.pairs[key].counts, b.pairs[key].counts)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    top_k=st.integers(1, 4),
    q=st.integers(1, 3),
    split=st.integers(1, 13),
    chunk=st.integers(1, 5),
)
def test_merge_is_exact(seed, top_k, q, split, chunk):
    corpus = make_corpus(seed)
    cfg = IndexConfig(top_k=top_k, quantile_buckets=3, quantile_examples=q, hist_bins=16, hist_min=1e-2,
                      hist_max=1e2, sample_bin_width=2, seed=seed)
    contexts = np.random.default_rng(seed).permutation(np.unique(corpus.context))
    whole = IndexAccumulator(corpus.widths, corpus.edges, cfg)
    feed(whole, corpus, contexts, chunk)
    shard_a = IndexAccumulator(corpus.widths, corpus.edges, cfg)
    shard_b = IndexAccumulator(corpus.widths, corpus.edges, cfg)
    feed(shard_a, corpus, contexts[:split], chunk, seed=1)
    feed(shard_b, corpus, contexts[split:], chunk + 1, seed=2)
    merged = shard_a.merge(shard_b).result()
    _assert_results_equal(merged, whole.result())
    assert_matches_brute_force(corpus, cfg, merged)


def test_merge_refuses_overlapping_shards_and_other_configs():
    corpus = make_corpus(seed=3)
    contexts = np.unique(corpus.context)
    a = IndexAccumulator(corpus.widths, corpus.edges, SMALL)
    b = IndexAccumulator(corpus.widths, corpus.edges, SMALL)
    feed(a, corpus, contexts, 14)
    feed(b, corpus, contexts[:3], 14)
    with pytest.raises(ValueError, match="disjoint"):
        a.merge(b)
    with pytest.raises(ValueError, match="same level widths"):
        a.merge(IndexAccumulator(corpus.widths, corpus.edges, IndexConfig()))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="two parents"):
        IndexAccumulator([2, 4], [((0, 0), (1, 1)), ((0, 1), (1, 1))])
    with pytest.raises(ValueError, match="a level below"):
        IndexAccumulator([2, 4, 8], [((0, 0), (2, 1))])
    acc = IndexAccumulator([4], [], SMALL)
    with pytest.raises(ValueError, match="width"):
        acc.add([(np.array([[4]]), np.array([[1.0]]))], [0], [0])
    with pytest.raises(ValueError, match=r"\[N=2, K\]"):
        acc.add([(np.zeros((1, 2), int), np.ones((1, 2)))], [0, 0], [0, 1])
    with pytest.raises(ValueError, match="context ids"):
        acc.add([(np.zeros((1, 1), int), np.ones((1, 1)))], [-1], [0])


def test_a_context_split_across_chunks_is_refused():
    corpus = make_corpus(seed=6, n_contexts=1)
    acc = IndexAccumulator(corpus.widths, corpus.edges, SMALL)
    for half in (slice(0, 2), slice(2, None)):
        acc.add([(i[half], v[half]) for i, v in corpus.codes], corpus.context[half], corpus.position[half])
    with pytest.raises(ValueError, match="more than one chunk"):
        acc.result()


def test_accepts_torch_tensors_and_bounds_kept_contexts():
    corpus = make_corpus(seed=4, n_contexts=40)
    acc = IndexAccumulator(corpus.widths, corpus.edges, SMALL)
    codes = [(torch.from_numpy(i), torch.from_numpy(v)) for i, v in corpus.codes]
    acc.add(codes, torch.from_numpy(corpus.context), torch.from_numpy(corpus.position))
    kept = acc.kept_context_ids()
    assert set(kept) >= set(acc.result().context_ids())
    # At most top_k + quantile_examples per sampling bin contexts per feature are kept.
    per_feature = SMALL.top_k + SMALL.quantile_examples * SMALL.sample_bins
    assert len(kept) <= sum(corpus.widths) * per_feature


def test_decoder_cosines_and_output_tokens():
    rng = np.random.default_rng(0)
    dec = [rng.normal(size=(3, 8)).astype(np.float32), rng.normal(size=(6, 8)).astype(np.float32)]
    pl, pi, cl, ci = np.array([0, 0]), np.array([1, 2]), np.array([1, 1]), np.array([4, 0])
    got = decoder_cosines(dec, pl, pi, cl, ci)
    for j in range(2):
        a, b = dec[0][pi[j]], dec[1][ci[j]]
        assert got[j] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), rel=1e-5)

    unembed = rng.normal(size=(50, 8)).astype(np.float32)
    out = top_output_tokens(dec[1], unembed, decode=lambda i: f"tok{i}", k=4, batch_features=4)
    logits = dec[1] @ unembed.T
    for f in range(6):
        want_pos = np.argsort(-logits[f])[:4]
        want_neg = np.argsort(logits[f])[:4]
        assert [t for t, _ in out.positive(f)] == [f"tok{i}" for i in want_pos]
        assert [t for t, _ in out.negative(f)] == [f"tok{i}" for i in want_neg]
        assert out.positive(f)[0][1] == pytest.approx(logits[f, want_pos[0]], rel=1e-5)


def test_context_store_keeps_only_what_is_asked():
    store = ContextStore(decode_tokens=lambda ids: [f"<{i}>" for i in ids])
    store.add([5, 9], np.array([[1, 2], [3, 4]]), ["doc-a", "doc-b"], [0, 7])
    store.add([2], np.array([[8, 8]]), ["doc-c"], [3])
    assert [r.tokens for r in store.get_contexts([9, 2])] == [["<3>", "<4>"], ["<8>", "<8>"]]
    store.retain([9])
    assert len(store) == 1
    (record,) = store.get_contexts([9])
    assert (record.doc_id, record.start) == ("doc-b", 7)
    with pytest.raises(KeyError):
        store.get_contexts([5])


def _cofiring(corpus: Corpus, upper: int, lower: int) -> np.ndarray:
    """Dense [W_upper, W_lower] tokens on which both features are active, token by token."""
    out = np.zeros((corpus.widths[upper], corpus.widths[lower]), np.int64)
    (iu, vu), (il, vl) = corpus.codes[upper], corpus.codes[lower]
    for t in range(len(corpus.context)):
        ups = {int(i) for i, v in zip(iu[t], vu[t], strict=True) if i >= 0 and v > 0}
        lows = {int(i) for i, v in zip(il[t], vl[t], strict=True) if i >= 0 and v > 0}
        for a in ups:
            for b in lows:
                out[a, b] += 1
    return out


@pytest.mark.parametrize("dense", [True, False])
def test_relatives_and_inferred_parents_match_brute_force(dense, monkeypatch):
    """Pair counts in a dense table (small widths) and as merged sparse chunks (wide ones) agree with a
    token-by-token count, and so do two merged shards."""
    if not dense:
        monkeypatch.setattr(accumulate, "DENSE_PAIRS_MAX", 0)
    corpus = make_corpus(seed=3)
    contexts = np.unique(corpus.context)
    acc = IndexAccumulator(corpus.widths, (), SMALL)  # no edges known up front
    assert all((pc._dense is not None) == dense for pc in acc.pairs.values())
    feed(acc, corpus, contexts[:5], 3)
    shard = IndexAccumulator(corpus.widths, (), SMALL)
    feed(shard, corpus, contexts[5:], 2)
    acc.merge(shard)
    fires = [lv["fire"] for lv in brute_force(corpus, SMALL)["levels"]]
    for (upper, lower), pc in acc.pairs.items():
        dense = _cofiring(corpus, upper, lower)
        best, count = pc.best_upper(corpus.widths[upper])
        want = np.where(dense.max(0) > 0, dense.argmax(0), -1)  # argmax: ties to the lowest index
        np.testing.assert_array_equal(best, want)
        np.testing.assert_array_equal(count, dense.max(0))
        if lower == upper + 1:
            acc.set_parents(lower, best)
    result = acc.result()
    e = result.edges()
    for j in range(len(e)):
        dense = _cofiring(corpus, e.parent_level[j], e.child_level[j])
        assert e.coactive[j] == dense[e.parent_idx[j], e.child_idx[j]]
    assert len(e) == sum(int((result.levels[lv].parent >= 0).sum()) for lv in (1, 2))

    rel = result.relatives(per_level=2)
    for level, width in enumerate(corpus.widths):
        for f in range(width):
            for other in range(len(corpus.widths)):
                if other == level:
                    continue
                dense = _cofiring(corpus, min(level, other), max(level, other))
                row = dense[f] if level < other else dense[:, f]
                want = [int(g) for g in np.lexsort((np.arange(len(row)), -row)) if row[g] > 0][:2]
                got = np.flatnonzero((rel.level == level) & (rel.idx == f) & (rel.rel_level == other))
                assert rel.rel_idx[got].tolist() == want
                assert rel.rank[got].tolist() == list(range(len(want)))
                for j in got:
                    both = row[rel.rel_idx[j]]
                    assert rel.coactive[j] == both
                    assert rel.p_relative_given_feature[j] == pytest.approx(both / fires[level][f])
                    want_p = both / fires[other][rel.rel_idx[j]]
                    assert rel.p_feature_given_relative[j] == pytest.approx(want_p)
