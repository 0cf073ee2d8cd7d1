"""Indexed runs for the browser tests and the UI benchmark, built without any model.

`small_run` goes through the real indexer (IndexAccumulator → write_run) on synthetic sparse codes over a
three-level forest, so feature pages show real contexts, histograms and edge statistics. `wide_run` bulk
inserts a run with many roots directly (only what the forest view reads), to measure the UI at scale.
"""

from __future__ import annotations

import numpy as np
from sqlalchemy import Engine, insert, update

from backend.db.models import Feature, FeatureEdge, Run, utcnow
from backend.index.writer import write_run
from trainer.index import (
    ContextStore,
    IndexAccumulator,
    IndexConfig,
    OutputTokens,
    RunInfo,
    decoder_cosines,
    pair_cosines,
)

# Three levels: 12 themes, 3 sub-themes each, 2 tokens each. A level-2 feature fires on its token, a level-1
# feature on either of its two, a root on any of its theme's six: contexts, output tokens and co-firing then
# agree with the forest. Theme 9 holds markup that must always show as text.
THEMES = [
    [" Paris", " Berlin", " Rome", " Madrid", " Tokyo", " Cairo"],
    [" France", " Germany", " Italy", " Spain", " Japan", " Egypt"],
    [" cat", " dog", " horse", " cow", " eagle", " owl"],
    [" 1", " 2", " 3", " 4", " 10", " 100"],
    [" bank", " money", " loan", " debt", " tax", " price"],
    [" river", " lake", " sea", " ocean", " rain", " flood"],
    [" mother", " father", " sister", " brother", " son", " daughter"],
    [" Monday", " Friday", " January", " June", " morning", " night"],
    [" red", " blue", " green", " yellow", " black", " white"],
    [" <b>bold</b>", " <img src=x onerror=alert(1)>", " &amp;", ' "quoted"', "()", " {"],
    [" happy", " sad", " angry", " afraid", " love", " hate"],
    [" café", " naïve", " über", "\n", ",", "."],  # (CJK and emoji would need fonts the CI lacks)
]
FILLER = [" the", " of", " and", " is", " a", " was", " it", " on", " in", " to", " that", " with"]
VOCAB = [token for theme in THEMES for token in theme] + FILLER
LEVEL_WIDTHS = (12, 36, 72)
# What a researcher might have written on the themed forest (the README's screenshot shows them).
DEMO_LABELS = {
    (0, 0): "capital cities", (0, 1): "country names", (0, 2): "animals", (0, 3): "numbers",
    (0, 4): "money and finance", (0, 5): "bodies of water", (0, 6): "family members",
    (0, 7): "days, months, times of day", (0, 8): "colours", (0, 9): "markup and code", (0, 10): "emotions",
    (0, 11): "punctuation and accented words",
    (1, 0): "Paris, Berlin", (1, 1): "Rome, Madrid", (1, 2): "capitals outside Europe",
    (1, 15): "rivers and lakes", (1, 16): "seas and oceans", (1, 17): "rain and floods",
    (2, 0): "Paris", (2, 1): "Berlin", (2, 30): "river", (2, 31): "lake",
}
CONTEXT_LENGTH = 24


def small_forest_edges() -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Level 0 → 1: three children per root; level 1 → 2: two children each, except the last root's subtree
    (left unassigned, as the Tree HSAE leaves its least similar features)."""
    edges = [((0, c // 3), (1, c)) for c in range(LEVEL_WIDTHS[1])]
    edges += [((1, c // 2), (2, c)) for c in range(LEVEL_WIDTHS[2] - 6)]
    return edges


def _corpus(rng: np.random.Generator, n_contexts: int) -> np.ndarray:
    """Token ids [C, T]: mostly filler, themed tokens with uneven frequencies (so densities differ)."""
    themed = len(VOCAB) - len(FILLER)
    theme_p = rng.dirichlet(np.full(len(THEMES), 0.8))
    token_p = np.concatenate([theme_p[t] * rng.dirichlet(np.full(6, 2.0)) for t in range(len(THEMES))])
    ids = themed + rng.integers(len(FILLER), size=(n_contexts, CONTEXT_LENGTH))
    is_themed = rng.random((n_contexts, CONTEXT_LENGTH)) < 0.35
    ids[is_themed] = rng.choice(themed, size=int(is_themed.sum()), p=token_p)
    return ids


def _codes(rng: np.random.Generator, token_ids: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per level (indices, values) [N, 2]: slot 0 the token's own features, slot 1 a weaker echo of the
    previous token's root (so roots also fire just after their theme, and P(child | parent) < 1)."""
    ids = token_ids.reshape(-1)
    n = len(ids)
    themed = ids < len(VOCAB) - len(FILLER)
    leaf = np.where(themed, ids, -1)  # level-2 index = token id for themed tokens
    strength = rng.gamma(3.0, 1.2, n).astype(np.float32)
    codes = []
    for level, divisor in ((0, 6), (1, 2), (2, 1)):
        indices = np.full((n, 2), -1, np.int64)
        values = np.zeros((n, 2), np.float32)
        indices[themed, 0] = leaf[themed] // divisor
        values[themed, 0] = strength[themed] * (1.0, 0.8, 0.6)[level] * rng.uniform(0.7, 1.0, themed.sum())
        codes.append((indices, values))
    silent = themed & (rng.random(n) < 0.04)  # the root misses a few of its tokens: P(parent | child) < 1
    codes[0][0][silent, 0], codes[0][1][silent, 0] = -1, 0
    previous_root = np.roll(np.where(themed, leaf // 6, -1), 1)
    previous_root[:: token_ids.shape[1]] = -1  # not across contexts
    echo = (previous_root >= 0) & (rng.random(n) < 0.6)
    codes[0][0][echo, 1] = previous_root[echo]
    codes[0][1][echo, 1] = rng.uniform(0.05, 1.5, echo.sum())
    return codes


def _output_tokens(rng: np.random.Generator, level: int, width: int, k: int = 8) -> OutputTokens:
    """A feature promotes its own tokens first, then its theme's, and suppresses other themes' tokens."""
    themed = len(VOCAB) - len(FILLER)
    group = (6, 2, 1)[level]
    pos, neg = [], []
    for i in range(width):
        own = list(range(i * group, (i + 1) * group))
        theme = [t for t in range((i * group // 6) * 6, (i * group // 6) * 6 + 6) if t not in own]
        others = [t for t in rng.permutation(themed) if t // 6 != i * group // 6]
        pos.append((own + theme + others)[:k])
        neg.append(others[-k:])
    pos_v = -np.sort(-rng.uniform(0.5, 3.0, (width, k))).astype(np.float32)
    neg_v = np.sort(-rng.uniform(0.5, 3.0, (width, k))).astype(np.float32)
    return OutputTokens(np.array(pos), pos_v, np.array(neg), neg_v, {i: VOCAB[i] for i in range(len(VOCAB))})


def small_run(engine: Engine, name: str = "demo-run", n_contexts: int = 300, seed: int = 0,
              labels: dict[tuple[int, int], str] | None = None) -> int:
    """A three-level run through the real indexer, with `labels` on some features; returns its id."""
    rng = np.random.default_rng(seed)
    edges = small_forest_edges()
    acc = IndexAccumulator(LEVEL_WIDTHS, edges, IndexConfig(top_k=8, quantile_buckets=4, quantile_examples=2))
    token_ids = _corpus(rng, n_contexts)
    acc.add(_codes(rng, token_ids), np.repeat(np.arange(n_contexts), CONTEXT_LENGTH),
            np.tile(np.arange(CONTEXT_LENGTH), n_contexts))
    store = ContextStore(lambda ids: [VOCAB[i] for i in ids])
    store.add(np.arange(n_contexts), token_ids, [f"doc-{c // 10}" for c in range(n_contexts)],
              (np.arange(n_contexts) % 10) * CONTEXT_LENGTH)
    info = RunInfo(
        name=name, model_name="synthetic/tiny", layer=6, hook="blocks.6.hook_resid_post", arch="tree",
        checkpoint_digest="0" * 64,
        config={"format": "hsae-checkpoint", "version": 1, "arch": "tree", "d_in": 64,
                "levels": [{"width": w, "k": 2} for w in LEVEL_WIDTHS]},
        corpus={"spec": "synthetic", "context_length": CONTEXT_LENGTH},
        metrics={"explained_variance": 0.8},
    )
    result = acc.result()
    cosines = rng.uniform(0.2, 0.9, len(result.edges())).astype(np.float32)
    output_tokens = [_output_tokens(rng, level, width) for level, width in enumerate(LEVEL_WIDTHS)]
    run_id = write_run(engine, result, info, store, output_tokens=output_tokens, edge_cosines=cosines)
    with engine.begin() as conn:
        for (level, index), label in (labels or {}).items():
            conn.execute(
                update(Feature)
                .where(Feature.run_id == run_id, Feature.level == level, Feature.idx == index)
                .values(label=label, annotated_at=utcnow())
            )
    return run_id


SAE_SOURCES = ["/data/saes/res-36", "/data/saes/res-72"]


def sae_lens_run(engine: Engine, name: str = "my-saes", n_contexts: int = 300, seed: int = 1) -> int:
    """What `hsae index-sae` writes for two flat SAEs of widths 36 and 72 (the themed forest's lower levels,
    with no edges known up front): parents inferred from co-firing after the pass, as the command does, and
    decoder cosines for edges and cross-width relatives."""
    from trainer.index.saelens import infer_tree  # imports the trainer's pipeline: only here

    rng = np.random.default_rng(seed)
    widths = LEVEL_WIDTHS[1:]
    acc = IndexAccumulator(widths, (), IndexConfig(top_k=8, quantile_buckets=4, quantile_examples=2))
    token_ids = _corpus(rng, n_contexts)
    acc.add(_codes(rng, token_ids)[1:], np.repeat(np.arange(n_contexts), CONTEXT_LENGTH),
            np.tile(np.arange(CONTEXT_LENGTH), n_contexts))
    infer_tree(acc, 0.1)
    store = ContextStore(lambda ids: [VOCAB[i] for i in ids])
    store.add(np.arange(n_contexts), token_ids, [f"doc-{c // 10}" for c in range(n_contexts)],
              (np.arange(n_contexts) % 10) * CONTEXT_LENGTH)
    levels = [{"path": path, "architecture": "topk", "d_sae": w, "features": [0, w], "width": w,
               "matryoshka_group": None} for path, w in zip(SAE_SOURCES, widths, strict=True)]
    info = RunInfo(
        name=name, model_name="synthetic/tiny", layer=6, hook="blocks.6.hook_resid_post", arch="sae-lens",
        checkpoint_digest="1" * 64,
        config={"source": "sae-lens", "levels": levels, "tree": "co-firing", "unassigned_fraction": 0.1},
        corpus={"spec": "synthetic", "context_length": CONTEXT_LENGTH},
    )
    result = acc.result()
    # decoder directions: a child's is its parent's plus noise, so cosines are those of a real family
    decoders = [rng.normal(size=(widths[0], 16))]
    decoders.append(decoders[0][np.maximum(result.levels[1].parent, 0)] + rng.normal(size=(widths[1], 16)))
    e, r = result.edges(), result.relatives()
    edge_cosines = decoder_cosines(decoders, e.parent_level, e.parent_idx, e.child_level, e.child_idx)
    relative_cosines = pair_cosines(decoders, r.level, r.idx, r.rel_level, r.rel_idx)
    output_tokens = [_output_tokens(rng, level + 1, width) for level, width in enumerate(widths)]
    return write_run(engine, result, info, store, output_tokens=output_tokens, edge_cosines=edge_cosines,
                     relative_cosines=relative_cosines)


WIDE_DEAD_EVERY = 1000  # every 1000th root of the wide run is dead, as some latents of a real run are


def wide_run(
    engine: Engine, name: str = "wide", roots: int = 10_000, children: int = 4, seed: int = 0
) -> int:
    """A two-level run with `roots` roots of `children` children each, bulk inserted (no examples). Every root
    has the same child count (as in an MoE run), and every WIDE_DEAD_EVERY-th root is dead (all zeros)."""
    rng = np.random.default_rng(seed)
    n_tokens = 1_000_000
    with engine.begin() as conn:
        run_id = conn.execute(insert(Run).values(
            name=name, model_name="synthetic/wide", layer=6, hook="blocks.6.hook_resid_post", arch="moe",
            checkpoint_digest="1" * 64, config={"arch": "moe"}, metrics=None, corpus={"spec": "synthetic"},
            index_settings={}, level_widths=[roots, roots * children], n_tokens=n_tokens,
            created_at=utcnow(), complete=False,
        ).returning(Run.id)).scalar_one()

        def rows(level: int, width: int) -> list[dict]:
            fires = rng.integers(0, n_tokens // 50, width)
            if level == 0:
                fires[::WIDE_DEAD_EVERY] = 0
            out = []
            for i in range(width):
                top = [[VOCAB[(i * 7 + j) % len(VOCAB)], 2.0 - 0.1 * j] for j in range(5)]
                alive = bool(fires[i])  # a dead latent's statistics are all zero
                out.append({
                    "run_id": run_id, "level": level, "idx": i,
                    "parent_level": None if level == 0 else 0,
                    "parent_idx": None if level == 0 else i // children,
                    "child_count": children if level == 0 else 0, "fire_count": int(fires[i]),
                    "density": float(fires[i]) / n_tokens, "max_act": float(rng.uniform(1, 10)) * alive,
                    "mean_act": float(rng.uniform(0.2, 1)) * alive, "top_positive": top, "top_negative": [],
                    "top_tokens_text": "\n".join(t for t, _ in top), "histogram": {"edges": [], "counts": []},
                    "label": f"root feature {i}" if level == 0 and i % 3 == 0 else None,
                    "note": None, "tags": [],
                })
            return out

        conn.execute(insert(Feature), rows(0, roots))
        conn.execute(insert(Feature), rows(1, roots * children))
        conn.execute(insert(FeatureEdge), [
            {"run_id": run_id, "parent_level": 0, "parent_idx": c // children, "child_level": 1,
             "child_idx": c, "coactive_count": 10, "p_parent_given_child": 0.9, "p_child_given_parent": 0.25,
             "decoder_cosine": 0.5}
            for c in range(roots * children)
        ])
        conn.execute(Run.__table__.update().where(Run.id == run_id).values(complete=True))
    return run_id
