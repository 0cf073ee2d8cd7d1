"""The MoE's data initialisation of experts: each piece against a construction whose answer is known.

Fragments and the expert subspace have their tests in test_models.py; these cover what keeps an expert's
children one per true child: clusters that are one child cut in two are merged (and a continuum is not),
children promoted to the top level go back to their parent, parents leaning towards one child are moved
back to the centre of their children, and the expert's read-out stays blind to its parent's direction; and
the offset subtracted before all of it leaves frequent features out and folds dense parents in.
"""

from __future__ import annotations

import pytest
import torch

from tests.trainer.helpers import two_parents_one_direction
from trainer.config import ArchConfig
from trainer.models import build_model
from trainer.models.base import (
    fragment_pairs,
    merge_unseparated,
    promoted_children,
    shared_offset,
    spherical_kmeans,
    unit_rows,
)
from trainer.models.moe import (
    fold_dense_parents,
    init_experts,
    mixed_parents,
    refit_parent_decoders,
    reseed_dead_parents,
    revive_children,
)


def _clusters(
    directions_CS: torch.Tensor, n: int, noise: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    label_N = torch.randint(len(directions_CS), (n,), generator=g)
    scale_N1 = 0.5 + torch.rand(n, 1, generator=g)
    u_NS = directions_CS[label_N] * scale_N1 + noise * torch.randn(n, directions_CS.shape[1], generator=g)
    return u_NS, label_N


def test_clusters_cut_in_two_are_merged_back_and_separated_ones_kept():
    """Three true children in 4 dimensions, six slots: k-means cuts some of them in two; after the merge
    every true child is one cluster again. Eight children at ±e_i (as close as 8 directions in 4 dimensions
    get) all keep their own slot."""
    g = torch.Generator().manual_seed(0)
    three = unit_rows(torch.randn(3, 4, generator=g))
    u_NS, label_N = _clusters(three, 900, 0.05, seed=1)
    centroids_CS = spherical_kmeans(u_NS, 6, g)
    centroids_CS, alive_C = merge_unseparated(u_NS, centroids_CS, min_separation=2.0, min_tightness=0.9)
    assert int(alive_C.sum()) == 3
    assign_N = (unit_rows(u_NS) @ centroids_CS.T).masked_fill(~alive_C, -2).argmax(-1)
    for true in range(3):
        _, counts = assign_N[label_N == true].unique(return_counts=True)
        assert counts.max() / counts.sum() > 0.99

    eight = torch.cat([torch.eye(4), -torch.eye(4)])
    u_NS, _ = _clusters(eight, 1600, 0.1, seed=2)
    _, alive_C = merge_unseparated(u_NS, spherical_kmeans(u_NS, 8, g), 2.0, 0.9)
    assert int(alive_C.sum()) == 8


def test_a_continuum_keeps_its_slots():
    """An expert whose tokens spread evenly (no true children, as SmolLM2's residuals mostly do): the cells
    k-means cuts are no better separated than the halves of one child, but together they are not tight, so
    no slot goes dormant. Without the tightness guard the same cells collapse into a few."""
    g = torch.Generator().manual_seed(3)
    u_NS = torch.randn(2000, 4, generator=g)
    centroids_CS = spherical_kmeans(u_NS, 16, g)
    _, alive_C = merge_unseparated(u_NS, centroids_CS, 2.0, 0.9)
    assert int(alive_C.sum()) >= 15
    _, unguarded_C = merge_unseparated(u_NS, centroids_CS, 2.0, 0.0)
    assert int(unguarded_C.sum()) <= 4


def test_promoted_children_are_found_and_independent_parents_are_not():
    """Latent 0 fires on 40% of rows; latent 3 fires only on rows where latent 0 fires (a child of it
    learned at the top level); latents 1 and 2 fire independently, 1 also with 0 at its base rate."""
    g = torch.Generator().manual_seed(4)
    n = 5000
    on0 = torch.rand(n, generator=g) < 0.4
    on1 = torch.rand(n, generator=g) < 0.3
    on2 = torch.rand(n, generator=g) < 0.2
    on3 = on0 & (torch.rand(n, generator=g) < 0.3)
    columns = [torch.where(on, i, -1) for i, on in enumerate((on0, on1, on2, on3))]
    indices_NK = torch.stack(columns, dim=1)
    assert promoted_children(indices_NK, 4, min_share=0.5) == [(3, 0)]
    assert promoted_children(indices_NK, 4, min_share=1.01) == []


def _one_parent_three_children(n: int = 3000, seed: int = 5):
    """Rows u + 0.6·w_c (+ noise) of one parent u with three orthogonal children w_c, in 16 dimensions."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(16, 16, generator=g)).Q.T
    u_D, w_CD = basis[0], basis[1:4]
    child_N = torch.randint(3, (n,), generator=g)
    x_ND = u_D + 0.6 * w_CD[child_N] + 0.01 * torch.randn(n, 16, generator=g)
    return x_ND, child_N, u_D, w_CD


def _one_parent_model(decoder_D: torch.Tensor, encoder_D: torch.Tensor, **fields):
    """A MoE of one parent (width 1, k 1, not centred) in `_one_parent_three_children`'s 16 dimensions, its
    top-level decoder and encoder set; `fields` are the rest of its ArchConfig (children, subspace, ...)."""
    model = build_model(ArchConfig(arch="moe", width=1, k=1, center=False, **fields), 16, seed=0)
    with torch.no_grad():
        model.W_dec_FD.copy_(decoder_D[None])
        model.W_enc_DF.copy_(encoder_D[:, None])
    return model

def test_refit_moves_a_parent_leaning_towards_one_child_to_the_centre_of_its_children():
    x_ND, _, u_D, w_CD = _one_parent_three_children()
    leaning_D = unit_rows(u_D + 0.6 * w_CD[0])
    model = _one_parent_model(leaning_D, u_D, children=3, subspace=2)
    x_n = model.normalize(x_ND)[0]
    refit_parent_decoders(model, x_n)
    d_D = unit_rows(model.W_dec_FD.detach()[0])
    towards_C = w_CD @ d_D
    assert float(towards_C.max() - towards_C.min()) < 0.05  # no child favoured
    assert float(d_D @ unit_rows(u_D + 0.2 * w_CD.sum(0))) > 0.99  # the mean of its events


def _six_slots_on_the_true_parent(child_separation: float):
    """(model, rows, true child per row): one parent already on `_one_parent_three_children`'s u, an expert
    of six slots for its three children."""
    x_ND, child_N, u_D, _ = _one_parent_three_children()
    model = _one_parent_model(u_D, u_D, children=6, subspace=3, child_separation=child_separation)
    return model, x_ND, child_N


def test_an_expert_with_fewer_children_than_slots_leaves_the_rest_dormant():
    """Three true children, six slots: each true child gets exactly one slot, the other three are dormant
    (zero encoder, never the argmax child), so no true child is split in halves that neither match it."""
    model, x_ND, child_N = _six_slots_on_the_true_parent(child_separation=2.0)
    assert init_experts(model, model.normalize(x_ND)[0], only_starved=False) == 1
    assert int(model.dormant_FC.sum()) == 3
    kept = model.encode(x_ND)[1].indices[:, 0]
    assert not bool(model.dormant_FC[0, kept.clamp(min=0)].any())
    for true in range(3):
        _, counts = kept[child_N == true].unique(return_counts=True)
        assert counts.max() / counts.sum() > 0.98
    assert len(kept.unique()) == 3


def test_without_separation_every_slot_is_used():
    """The paper's setting (`child_separation=0`): the six slots split the three children between them."""
    model, x_ND, _ = _six_slots_on_the_true_parent(child_separation=0.0)
    init_experts(model, model.normalize(x_ND)[0], only_starved=False)
    assert not bool(model.dormant_FC.any())
    assert len(model.encode(x_ND)[1].indices[:, 0].unique()) == 6


def test_the_experts_read_out_stays_blind_to_its_parent_when_asked_only(rows):
    x = torch.from_numpy(rows[:256])
    for blind in (True, False):
        cfg = ArchConfig(arch="moe", width=16, k=4, children=4, subspace=2, expert_blind_to_parent=blind)
        model = build_model(cfg, x.shape[1], seed=0)
        model.prepare(x)
        model.loss(x, step=10).loss.backward()
        with torch.no_grad():
            for param in model.parameters():
                param -= 0.05 * param.grad
        model.after_optimizer_step(1)
        d_FD = unit_rows(model.W_dec_FD.detach())
        along_FS = torch.einsum("fsd,fd->fs", model.P_down_FSD.detach(), d_FD)
        assert (along_FS.abs().max().item() < 1e-5) == blind


def _offset_and_a_frequent_feature(offset: float, seed: int = 0):
    """Rows = a shared offset of norm `offset` + a frequent feature u on 45% of the rows (magnitude
    U(0.5, 1.5)) + one of 30 rare features each row (orthogonal to the rest) + noise."""
    g = torch.Generator().manual_seed(seed)
    d, n = 64, 8000
    basis_DD, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    offset_D, u_D, rare_RD = offset * basis_DD[:, 0], basis_DD[:, 1], basis_DD[:, 2:32].T
    on_N1 = (torch.rand(n, 1, generator=g) < 0.45).float()
    a_N1 = 0.5 + torch.rand(n, 1, generator=g)
    rare_ND = rare_RD[torch.randint(30, (n,), generator=g)] * (0.5 + torch.rand(n, 1, generator=g))
    x_ND = offset_D + on_N1 * a_N1 * u_D + rare_ND + 0.02 * torch.randn(n, d, generator=g)
    return x_ND, offset_D, u_D


def test_the_shared_offset_leaves_a_frequent_features_share_out_and_keeps_a_real_offset():
    """Without an offset, the mean holds 0.45 of the frequent feature (the anti-feature every other row
    would need) and the 5% quantile along the mean's direction almost none; with a real offset of norm 3, the
    quantile keeps over 95% of it. (It is one scalar along one direction: with both at once it keeps most
    of the feature's share too; where the tokens then vary densely along it, the MoE falls back to the
    mean.)"""
    x_ND, _, u_D = _offset_and_a_frequent_feature(0.0)
    mean_D = shared_offset(x_ND, None)
    assert torch.allclose(mean_D, x_ND.mean(0))
    assert float(mean_D @ u_D) > 0.4
    assert abs(float(shared_offset(x_ND, 0.05) @ u_D)) < 0.1
    x_ND, offset_D, _ = _offset_and_a_frequent_feature(3.0)
    assert float(shared_offset(x_ND, 0.05) @ offset_D) / float(offset_D @ offset_D) > 0.95


def test_a_parent_on_every_token_makes_the_offset_fall_back_to_the_mean():
    """A top-level latent along the offset, firing on every token: the subtracted offset becomes the mean,
    that latent is re-seeded elsewhere, and no parent then fires on more than half the tokens. A latent below
    the density keeps its weights, and without a dense latent nothing changes."""
    x_ND, offset_D, u_D = _offset_and_a_frequent_feature(3.0, seed=1)
    cfg = ArchConfig(arch="moe", width=4, k=2, children=2, subspace=2)
    model = build_model(cfg, x_ND.shape[1], seed=0)  # nothing subtracted yet: the offset is on every token
    dense_D = unit_rows(offset_D)
    with torch.no_grad():
        model.W_dec_FD[:2] = torch.stack([dense_D, u_D])
        model.W_enc_DF[:, :2] = torch.stack([dense_D, u_D]).T
        model.W_enc_DF[:, 2:] = 0  # silent: the fold sees the two latents alone
    assert fold_dense_parents(model, x_ND, 0.5) == [0]
    assert torch.allclose(model.input_mean_D, x_ND.mean(0))
    assert float(model.W_dec_FD.detach()[0] @ dense_D) < 0.9  # re-seeded
    assert torch.equal(model.W_dec_FD.detach()[1], u_D)
    indices = model.encode(x_ND)[0].indices
    density_F = torch.stack([(indices == j).any(1).float().mean() for j in range(4)])
    assert float(density_F.max()) <= 0.5
    state = (model.input_mean_D, model.W_enc_DF, model.W_dec_FD)
    before = [t.detach().clone() for t in state]
    assert fold_dense_parents(model, x_ND, 0.5) == []
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, state))


def test_the_experts_subspace_is_orthogonal_to_its_parent_after_whitening():
    """The residuals an expert is fitted on have no part along d_j, but whitening tilts their principal
    directions towards it; projected back out, the expert reads what sets the children apart, not the
    parent's own value, which is the same for all of them."""
    x_ND, child_N, u_D, _ = _one_parent_three_children()
    x_ND = x_ND * (0.5 + torch.rand(len(x_ND), 1, generator=torch.Generator().manual_seed(1)))  # magnitudes
    leaning_D = unit_rows(u_D + 0.3 * torch.randn(16, generator=torch.Generator().manual_seed(2)))
    # a parent direction that leaves much along itself, and values short of the projection: residual along d
    model = _one_parent_model(leaning_D, 0.7 * leaning_D, children=3, subspace=3)
    assert init_experts(model, model.normalize(x_ND)[0], only_starved=False) == 1
    assert float((model.P_down_FSD.detach()[0] @ leaning_D).abs().max()) < 1e-5
    kept = model.encode(x_ND)[1].indices[:, 0]
    for true in range(3):  # and each true child still has its own slot
        _, counts = kept[child_N == true].unique(return_counts=True)
        assert counts.max() / counts.sum() > 0.95


def _fragments_and_companions(weak_twin: float, strong_pair: float):
    """Indices and values of 4 latents on 2000 rows: 0 and 1 take alternate rows (fragments) and 1 also
    fires on a `weak_twin` share of 0's rows at a tenth of its value; 2 and 3 fire on random halves of the
    rows and together on a `strong_pair` share more, both with their usual values. Decoders 0·1 and 2·3 at
    cosine 0.7."""
    g = torch.Generator().manual_seed(0)
    n = 2000
    indices = torch.full((n, 3), -1)
    values = torch.zeros(n, 3)
    even = torch.arange(n) % 2 == 0
    indices[:, 0] = torch.where(even, 0, 1)
    values[:, 0] = 1.0 + 0.1 * torch.rand(n, generator=g)
    twin = even & (torch.rand(n, generator=g) < 2 * weak_twin)
    indices[:, 1] = torch.where(twin, 1, -1)
    values[:, 1] = torch.where(twin, 0.1, 0.0)
    pick = torch.rand(n, generator=g)
    both = pick < strong_pair
    indices[:, 2] = torch.where(both | (pick > 0.5 + strong_pair / 2), 2, torch.where(pick < 0.5, 3, -1))
    indices[:, 2] = torch.where(both, 2, indices[:, 2])
    values[:, 2] = torch.where(indices[:, 2] >= 0, 1.0, 0.0)
    extra = torch.where(both, 3, -1)
    indices = torch.cat([indices, extra[:, None]], 1)
    values = torch.cat([values, torch.where(both, 1.0, 0.0)[:, None]], 1)
    basis = torch.linalg.qr(torch.randn(8, 8, generator=g)).Q.T
    near_0, near_2 = 0.7 * basis[0] + 0.71 * basis[1], 0.7 * basis[2] + 0.71 * basis[3]
    W_dec = torch.stack([basis[0], near_0, basis[2], near_2])
    return indices, values, W_dec


def test_a_fragment_picked_weakly_beside_its_twin_still_counts_as_a_fragment():
    """TopK with two events per row often adds a fragment, weakly, beside its twin: those rows do not make
    the two distinct features. Two latents that fire together strongly are distinct, however close."""
    indices, values, W_dec = _fragments_and_companions(weak_twin=0.12, strong_pair=0.12)
    pairs = fragment_pairs(indices, W_dec, 0.5, values)
    assert [(min(p[:2]), max(p[:2])) for p in pairs] == [(0, 1)]
    assert fragment_pairs(indices, W_dec, 0.5) == []  # counting every row misses them


def test_fragments_of_a_frequent_parent_meet_below_chance_and_a_promoted_child_above_it():
    """Latents 0 and 1 (decoder cosine 0.7): 0 on half of the rows, 1 on a fifth, together on 120 rows, 15%
    of the rarer one's (more than MAX_FRAGMENT_COFIRING) but 0.3 of chance: fragments with `max_lift` 0.5,
    not without. Latents 2 and 3 (cosine 0.7): 3 always fires with 2, at twice chance: never a pair."""
    n = 4000
    row = torch.arange(n)
    indices = torch.stack([
        torch.where(row < 2000, 0, 2),
        torch.where((row >= 1880) & (row < 2680), 1, torch.where((row >= 3000) & (row < 3400), 3, -1)),
    ], 1)
    values = torch.where(indices >= 0, 1.0, 0.0)
    basis = torch.eye(8)
    near_0, near_2 = 0.7 * basis[0] + 0.71 * basis[1], 0.7 * basis[2] + 0.71 * basis[3]
    W_dec = torch.stack([basis[0], near_0, basis[2], near_2])
    assert fragment_pairs(indices, W_dec, 0.5, values) == []
    pairs = fragment_pairs(indices, W_dec, 0.5, values, max_lift=0.5)
    assert [p[:2] for p in pairs] == [(0, 1)] and pairs[0][2:] == (2000, 800)
    assert fragment_pairs(indices, W_dec, 0.5, values, max_lift=0.25) == []  # 0.3 of chance is above 0.25


def _slot_on_two_children(**fields):
    """(model, rows, true child per row): `_one_parent_three_children` with an expert whose subspace is the
    children's span and whose slot 0 sits between true children 0 and 1, slot 1 on child 2, slot 2 where no
    token is; encoders = atoms, so values are projections and slot 0 leaves a part along w0 - w1. `fields`
    are the rest of the ArchConfig."""
    x_ND, child_N, u_D, w_CD = _one_parent_three_children()
    model = _one_parent_model(u_D, u_D, children=3, subspace=3, **fields)
    with torch.no_grad():
        model.P_down_FSD[0] = w_CD
        model.P_up_FSD[0] = w_CD
        atoms = unit_rows(torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, -1.0, -1.0]]))
        model.D_dec_FCS[0] = atoms
        model.E_enc_FCS[0] = atoms
    return model, x_ND, child_N


def test_a_starved_child_is_revived_on_its_experts_residual_and_the_others_keep_their_weights():
    """Slot 0 sits between true children 0 and 1 and takes both, slot 1 takes child 2, slot 2 points where
    no token is. Revived, slot 2 is re-seeded on the residual of one of the expert's tokens (which the merged
    slot leaves along w0 - w1), and it takes tokens of child 0 or 1; slots 0 and 1 are unchanged."""
    model, x_ND, child_N = _slot_on_two_children(expert_blind_to_parent=True)
    x_n = model.normalize(x_ND)[0]
    before = model.E_enc_FCS.detach().clone()
    assert revive_children(model, x_n) == 1
    assert torch.equal(model.E_enc_FCS.detach()[0, :2], before[0, :2])
    atom = model.D_dec_FCS.detach()[0, 2]
    assert float(atom[2].abs()) < 0.2 and float((atom[0] + atom[1]).abs()) < 0.2  # along w0 - w1
    kept = model.encode(x_ND)[1].indices[:, 0]
    takes = kept == 2
    assert takes.float().mean() > 0.1 and bool((child_N[takes] != 2).all())
    assert revive_children(model, x_n) == 0  # nothing starved any more


def _fragmented_parent(**extra):
    """A MoE of two top-level latents that are fragments of `_one_parent_three_children`'s parent (one
    leans to child 0, one to child 1; decoder cosine 0.74, never on the same row with k = 1), a round
    scheduled at 50% of a 100-step run and a polish round at 80%; `extra`: more ArchConfig fields."""
    x_ND, _, u_D, w_CD = _one_parent_three_children()
    fields = {"width": 2, "k": 1, "center": False, "children": 3, "subspace": 3, **extra}
    model = build_model(ArchConfig(arch="moe", expert_init_at=[0.5], polish_at=[0.8], **fields), 16, seed=0)
    fragments_2D = unit_rows(u_D + 0.6 * w_CD[:2])
    with torch.no_grad():
        model.W_dec_FD.copy_(fragments_2D)
        model.W_enc_DF.copy_(fragments_2D.T)
    model.start_training(100)
    return model, x_ND


def test_a_polish_round_redoes_the_experts_and_leaves_the_top_levels_latents_alone():
    """Late in the run (`polish_at`) experts are redone and parents refitted, but fragments are not merged
    (`late_merge_cos` 1, the default of a config built directly). An `expert_init_at` round on the same
    model merges them."""
    model, x_ND = _fragmented_parent()
    assert model.reassign_due(80) and model.reassign_due(50) and not model.reassign_due(60)
    encoders = model.W_enc_DF.detach().clone()
    experts = model.E_enc_FCS.detach().clone()
    model.reassign(x_ND, 80)
    assert torch.equal(model.W_enc_DF.detach(), encoders)  # nothing merged, freed or re-seeded
    assert not torch.equal(model.E_enc_FCS.detach(), experts)  # the experts are redone
    codes = model.encode(x_ND)[0]
    assert len(fragment_pairs(codes.indices, model.W_dec_FD.detach(), 0.5, codes.values)) == 1

    model, x_ND = _fragmented_parent()
    model.reassign(x_ND, 50)
    assert not torch.equal(model.W_enc_DF.detach(), encoders)
    codes = model.encode(x_ND)[0]
    assert fragment_pairs(codes.indices, model.W_dec_FD.detach(), 0.5, codes.values) == []


def test_a_polish_round_merges_fragments_from_late_merge_cos():
    """With `late_merge_cos` (the project preset's 0.4) the polish round merges the top level's fragments
    too, as an `expert_init_at` round does: one latent fires on all of the parent's rows, and its expert,
    redone, tells the three children apart."""
    model, x_ND = _fragmented_parent(late_merge_cos=0.5)
    _, child_N, _, _ = _one_parent_three_children()
    model.reassign(x_ND, 80)
    codes = model.encode(x_ND)
    top_N = codes[0].indices.squeeze(1)
    assert fragment_pairs(codes[0].indices, model.W_dec_FD.detach(), 0.5, codes[0].values) == []
    parent = int(top_N.mode().values)
    assert float((top_N == parent).float().mean()) > 0.99
    slot_N = codes[1].indices.squeeze(1) - parent * 3
    for c in range(3):  # each true child has a slot of its own
        assert float((slot_N[child_N == c] == slot_N[child_N == c].mode().values).float().mean()) > 0.9
    assert len({int(slot_N[child_N == c].mode().values) for c in range(3)}) == 3


def test_a_polish_round_redoes_an_expert_only_where_the_fresh_one_explains_its_tokens_better():
    """An expert whose slot 0 takes two true children (slot 2 points where no token is) is redone, and then
    each true child has a slot of its own; the expert just found from the same sample is kept (its fresh
    copy is no better), so an expert that training has fitted is left to keep what it learned."""
    model, x_ND, child_N = _slot_on_two_children(refit_parents=False)
    x_n = model.normalize(x_ND)[0]
    assert init_experts(model, x_n, only_starved=False, only_better=True) == 1
    kept = model.encode(x_ND)[1].indices[:, 0]
    for true in range(3):
        _, counts = kept[child_N == true].unique(return_counts=True)
        assert counts.max() / counts.sum() > 0.98
    assert len(kept.unique()) == 3
    experts = model.E_enc_FCS.detach().clone()
    assert init_experts(model, x_n, only_starved=False, only_better=True) == 0
    assert torch.equal(model.E_enc_FCS.detach(), experts)


def test_a_dead_parent_is_reseeded_where_the_live_one_covers_two_true_parents():
    """Rows carry one of two orthogonal parents u1, u2; latent 0 sits between them and takes every row,
    latent 1 points away from all of them and never fires. Re-seeded on the residual of a badly
    reconstructed row (u1 or u2 less its part along latent 0: the direction u1 - u2 or its opposite), it
    fires on one true parent's rows; a second call finds nothing dead. (Without `split_mixed_parents`,
    which would split latent 0 instead: the next test.)"""
    basis, which_N, x_ND, between_D = two_parents_one_direction()
    config = ArchConfig(
        arch="moe", width=2, k=1, center=False, children=2, subspace=2, split_mixed_parents=False
    )
    model = build_model(config, 16, seed=0)
    with torch.no_grad():
        model.W_dec_FD.copy_(torch.stack([between_D, -between_D]))
        model.W_enc_DF.copy_(torch.stack([between_D, -between_D]).T)
    x_n = model.normalize(x_ND)[0]
    assert not bool((model.encode(x_ND)[0].indices == 1).any())
    assert reseed_dead_parents(model, x_n) == [1]
    d_D = unit_rows(model.W_dec_FD.detach()[1])
    assert abs(float(d_D @ between_D)) < 0.1 and abs(float(d_D @ unit_rows(basis[0] - basis[1]))) > 0.9
    fires_N = (model.encode(x_ND)[0].indices == 1).any(1)
    assert fires_N.float().mean() > 0.2
    assert len(which_N[fires_N].unique()) == 1  # one true parent's rows
    assert reseed_dead_parents(model, x_n) == []


def _one_parent_two_children() -> torch.Tensor:
    """2,000 rows of one parent u (basis row 0) at a magnitude in [0.5, 1.5] and one of its two children,
    orthogonal to it and to each other (basis rows 1 and 2), each as strong as the parent (the `orthogonal`
    generator's children), plus a little noise."""
    g = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(16, 16, generator=g)).Q.T
    child_N = 1 + torch.randint(2, (2000,), generator=g)
    a_N1, b_N1 = 0.5 + torch.rand(2000, 1, generator=g), 0.5 + torch.rand(2000, 1, generator=g)
    return a_N1 * basis[0] + b_N1 * basis[child_N] + 0.01 * torch.randn(2000, 16, generator=g)


def test_a_live_latent_holding_two_parents_is_split_with_a_dead_one_and_a_parent_of_two_children_is_not():
    """`mixed_parents`: latent 0 sits between two orthogonal parents and fires on every row; the two halves
    of what it explains are the parents, nearly orthogonal, so `reseed_dead_parents` gives the dead latent 1
    one parent's direction and latent 0 the other's: each then fires on one true parent's rows. A latent on
    one parent whose two children are as strong as it (halves at cosine about 0.5) is left whole, and the
    dead latent goes to a badly reconstructed row's residual instead."""
    basis, which_N, x_ND, between_D = two_parents_one_direction()
    config = ArchConfig(arch="moe", width=2, k=1, center=False, children=2, subspace=2)
    model = build_model(config, 16, seed=0)
    with torch.no_grad():
        model.W_dec_FD.copy_(torch.stack([between_D, -between_D]))
        model.W_enc_DF.copy_(torch.stack([between_D, -between_D]).T)
    x_n = model.normalize(x_ND)[0]
    assert [j for j, _, _ in mixed_parents(model, x_n, *model._codes(x_n)[:2], torch.Generator())] == [0]
    assert sorted(reseed_dead_parents(model, x_n)) == [0, 1]
    cos_FT = unit_rows(model.W_dec_FD.detach()) @ basis[:2].T
    assert sorted(cos_FT.argmax(-1).tolist()) == [0, 1] and float(cos_FT.max(-1).values.min()) > 0.95
    top_N = model.encode(x_ND)[0].indices[:, 0]
    for latent in (0, 1):
        assert len(which_N[top_N == latent].unique()) == 1 and (top_N == latent).float().mean() > 0.3

    x_ND = _one_parent_two_children()
    u_D = unit_rows(x_ND.mean(0))
    model = build_model(config, 16, seed=0)
    with torch.no_grad():
        model.W_dec_FD.copy_(torch.stack([u_D, -u_D]))
        model.W_enc_DF.copy_(torch.stack([u_D, -u_D]).T)
    x_n = model.normalize(x_ND)[0]
    assert mixed_parents(model, x_n, *model._codes(x_n)[:2], torch.Generator()) == []
    assert reseed_dead_parents(model, x_n) == [1]
    assert float(unit_rows(model.W_dec_FD.detach()[0]) @ u_D) > 0.999  # latent 0 kept


def test_a_dead_parent_is_reseeded_at_once_at_a_round_not_after_the_experts_take_up_the_mixture():
    """`reseed_dead_parents`'s two parents held by one latent, through a whole round (`reassign`). Re-seeded
    after the repairs, the dead latent would come too late: the live latent's redone expert spends its two
    slots on the two parents' difference, nothing is left badly reconstructed there, and the mixture stays
    (synthetic `noisy` seed 0 kept one such latent to the end): it fires nowhere and points at the noise.
    Re-seeded at once, it takes one true parent."""
    basis, which_N, x_ND, between_D = two_parents_one_direction()
    config = ArchConfig(
        arch="moe", width=2, k=1, center=False, children=2, subspace=2, expert_init_at=[0.5, 0.9]
    )
    model = build_model(config, 16, seed=0)
    with torch.no_grad():
        model.W_dec_FD.copy_(torch.stack([between_D, -between_D]))
        model.W_enc_DF.copy_(torch.stack([between_D, -between_D]).T)
    model.start_training(100)
    model.reassign(x_ND, 50)
    fires_N = (model.encode(x_ND)[0].indices == 1).any(1)
    shares = sorted(float(fires_N[which_N == true].float().mean()) for true in range(2))
    assert shares[0] < 0.02 and shares[1] > 0.3  # one true parent's rows (training takes the rest)
    assert float((unit_rows(model.W_dec_FD.detach()[1]) @ basis[:2].T).abs().max()) > 0.9


@pytest.mark.parametrize("step", [50, 80], ids=["round", "polish round"])
def test_a_latent_freed_by_a_merge_is_reseeded_where_the_repaired_model_leaves_most_unexplained(step):
    """`_fragmented_parent`'s two fragments of one parent, and on 3% of the rows a feature g that no latent
    covers. A round (or the polish round, with `late_merge_cos` 0.5) merges the fragments; before the repairs
    the worst reconstructed rows are as often the parent's rows whose child neither fragment holds (residual
    0.6·w) as g's rows, and a latent re-seeded there would split the parent again. It is re-seeded once the
    merged parent's expert is redone, when only g's rows are left unexplained: it fires on g's rows and
    nowhere else. At the polish round this needs the merged encoder at `merge_pair`'s norm: the bare sum of
    the pair's encoders doubles the parent's value, and the latent lands on that overshoot."""
    model, x_ND = _fragmented_parent(late_merge_cos=0.5)  # merges at the polish round too
    _, _, u_D, w_CD = _one_parent_three_children()
    g = torch.Generator().manual_seed(1)
    g_D = torch.randn(16, generator=g)
    g_D = unit_rows(g_D - torch.linalg.lstsq(torch.cat([u_D[None], w_CD]).T, g_D[:, None]).solution.T
                    @ torch.cat([u_D[None], w_CD]))
    on_N = torch.rand(len(x_ND), generator=g) < 0.03
    x_ND = torch.where(on_N[:, None], g_D + 0.01 * torch.randn(x_ND.shape, generator=g), x_ND)
    assert not (model.encode(x_ND)[0].indices.squeeze(1)[on_N] >= 0).any()  # nothing covers g yet

    model.reassign(x_ND, step)

    top_N = model.encode(x_ND)[0].indices.squeeze(1)
    assert float((top_N[on_N] >= 0).float().mean()) > 0.95  # g is covered now
    freed = int(top_N[on_N].mode().values)
    assert float((top_N[on_N] == freed).float().mean()) > 0.95
    assert float((top_N[~on_N] == freed).float().mean()) < 0.01
    assert float((top_N[~on_N] == 1 - freed).float().mean()) > 0.99  # the merged parent
    assert float((unit_rows(model.W_dec_FD.detach()[freed]) * g_D).sum()) > 0.9
