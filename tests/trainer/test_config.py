import json

import pytest

from trainer.config import ArchConfig, ConfigError, RunConfig, TrainConfig


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(arch="flat"), "arch must be one of"),
        (dict(arch="topk", width=16, k=32), r"k \(32\) must be between 1 and width \(16\)"),
        (dict(arch="topk", width=0), "width must be >= 1"),
        (dict(arch="moe", width=64, k=8, children=0), "children must be >= 1"),
        (dict(arch="moe", subspace=0), "subspace must be >= 1"),
        (dict(arch="tree", levels=[64, 32]), "strictly increasing"),
        (dict(arch="tree", levels=[64, 64, 128]), "strictly increasing"),
        (dict(arch="tree", levels=[64]), "at least 2 levels"),
        (dict(arch="tree", levels=[8, 16], level_k=[4]), "level_k has 1 entries but there are 2 levels"),
        (dict(arch="tree", levels=[8, 16], level_k=[9, 4]), r"level k \(9\) must be between 1 and its level"),
        (dict(arch="tree", width=64), "width does not apply to arch 'tree'"),
        (dict(arch="topk", levels=[8, 16]), "apply only to arch 'tree'"),
        (dict(arch="tree", levels=[8, 16], perturb_rate=1.0), "perturb_rate must be in"),
        (dict(arch="tree", levels=[8, 16], unassigned_fraction=-0.1), "unassigned_fraction must be in"),
        (dict(arch="tree", levels=[8, 16], reassign_every=0), "reassign_every must be >= 1"),
        (dict(arch="tree", levels=[8, 16], assign_by="random"), "assign_by must be coactivation, encoder or"),
        (dict(arch="tree", levels=[8, 16], reassign_tokens=0), "reassign_tokens must be >= 1"),
        (dict(arch="moe", l1_coef=-1.0), "l1_coef must be >= 0"),
        (dict(arch="moe", expert_init_at=[0.5, 1.0]), r"expert_init_at must hold fractions of the run"),
        (dict(arch="tree", levels=[8, 16], child_init_at=[0.0]), r"child_init_at must hold fractions"),
    ],
)
def test_arch_config_rejects_bad_values_with_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        ArchConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_subspace_is_checked_against_d_in():
    cfg = ArchConfig(arch="moe", width=64, k=8, subspace=16)
    cfg.validate_for(16)
    with pytest.raises(ConfigError, match=r"subspace \(16\) must not exceed d_in \(8\)"):
        cfg.validate_for(8)


@pytest.mark.parametrize(
    "preset, children, subspace", [("project", 4, 4), ("project", 6, 6), ("project", 16, 8), ("paper", 16, 4),
                                   ("paper", 64, 8)],
)
def test_the_moe_subspace_defaults_to_the_children_up_to_8_or_to_the_papers(preset, children, subspace):
    arch = RunConfig.compose({"arch": "moe", "children": children}, preset=preset).arch
    assert arch.subspace == subspace
    given = RunConfig.compose({"arch": "moe", "children": children, "subspace": 3}, preset=preset).arch
    assert given.subspace == 3
    assert RunConfig.from_dict({"arch": arch.to_dict()}).arch.subspace == subspace  # cfg.json records it


def test_defaults_are_resolved_per_architecture():
    assert (ArchConfig(arch="moe").width, ArchConfig(arch="moe").k) == (1024, 32)
    assert ArchConfig(arch="topk").width == 4096
    tree = ArchConfig(arch="tree", levels=[16, 64], k=8)
    assert tree.level_k == [8, 8] and tree.width is None
    assert ArchConfig(arch="tree").levels == [512, 1024, 2048, 4096]
    assert ArchConfig().resolved_aux_k(576) == 288 and ArchConfig(aux_k=7).resolved_aux_k(576) == 7
    assert tree.resolved_reassign_every(100_000) == 5000 and tree.resolved_reassign_every(300) == 30
    assert ArchConfig(arch="tree", reassign_every=7).resolved_reassign_every(100_000) == 7


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch_size=0), "batch_size must be >= 1"),
        (dict(max_norm_multiple=1.0), "max_norm_multiple must be > 1"),
        (dict(lr=0), "lr must be > 0"),
        (dict(steps=0), "steps must be >= 1"),
        (dict(adam_betas=(0.9, 1.0)), "adam_betas must be two numbers"),
        (dict(grad_clip=0), "grad_clip must be > 0"),
        (dict(dtype="float16"), "dtype must be auto, float32 or bfloat16"),
        (dict(device="tpu-ish"), "device must be auto, cpu, cuda"),
        (dict(min_lr_ratio=2), "min_lr_ratio must be in"),
    ],
)
def test_train_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**kwargs)


def test_train_config_resolves_device_dtype_and_warmup():
    cfg = TrainConfig(device="cpu")
    assert cfg.resolved_device().type == "cpu" and str(cfg.resolved_dtype()) == "torch.float32"
    assert cfg.resolved_warmup(50_000) == 1000 and cfg.resolved_warmup(300) == 30
    assert TrainConfig(warmup_steps=7).resolved_warmup(300) == 7


def test_round_trip_through_dict_and_file(tmp_path):
    run = RunConfig(
        ArchConfig(arch="tree", levels=[8, 16, 32]),
        TrainConfig(batch_size=8, adam_betas=(0, 0.9)),
    )
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"arch": run.arch.to_dict(), "train": run.train.to_dict()}))
    assert RunConfig.load(path) == run


def test_config_file_errors_are_config_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read config file"):
        RunConfig.load(bad)
    with pytest.raises(ConfigError, match="unknown ArchConfig field"):
        RunConfig.from_dict({"arch": {"arch": "moe", "parents": 3}})
    with pytest.raises(ConfigError, match="unknown config section"):
        RunConfig.from_dict({"model": {}})


def test_tree_presets_differ_by_child_init_and_assignment():
    project = RunConfig.compose({"arch": "tree", "levels": [8, 16]}, {}, "project")
    paper = RunConfig.compose({"arch": "tree", "levels": [8, 16]}, {}, "paper")
    assert project.arch.child_init_at == [0.3, 0.6] and project.arch.assign_by == "coactivation"
    assert paper.arch.child_init_at == [] and paper.arch.assign_by == "encoder" and paper.train.lr == 5e-4
    assert project.arch.merge_cos == 0.5 and paper.arch.merge_cos == 1.0  # the papers merge nothing
    # TopK with a floor is the project's; the paper's TopK fills every slot, as does a config built directly
    # (an older checkpoint's cfg.json without the field encodes as it did)
    assert project.arch.min_activation == 0.25 and paper.arch.min_activation == 0.0
    assert ArchConfig(arch="tree", levels=[8, 16]).min_activation == 0.0
    with pytest.raises(ConfigError, match="min_activation must be >= 0"):
        ArchConfig(arch="tree", levels=[8, 16], min_activation=-1)
    # every parent's children redone at the later child rounds is the project's
    assert project.arch.child_reinit == "all"
    assert ArchConfig(arch="tree", levels=[8, 16]).child_reinit == "starved"
    with pytest.raises(ConfigError, match="child_reinit must be all or starved"):
        ArchConfig(arch="tree", levels=[8, 16], child_reinit="some")
    # fragments merged after the last child round: the project's, from cosine 0.4
    assert project.arch.late_merge_cos == 0.4 and ArchConfig(arch="tree", levels=[8, 16]).late_merge_cos == 1
    with pytest.raises(ConfigError, match=r"late_merge_cos must be a cosine in \[-1, 1\]"):
        ArchConfig(arch="tree", levels=[8, 16], late_merge_cos=2)


def test_merge_cos_is_a_cosine():
    assert RunConfig.compose({"arch": "moe"}, {}, "paper").arch.merge_cos == 1.0
    with pytest.raises(ConfigError, match="merge_cos must be a cosine"):
        ArchConfig(arch="moe", merge_cos=1.5)


def test_merge_lift_is_the_moe_project_presets_and_a_share_below_one():
    """Fragments that fire together below chance: the MoE's project preset; the tree's preset, the paper's
    and a config built directly (an older checkpoint's cfg.json) keep the strict rule."""
    assert RunConfig.compose({"arch": "moe"}, {}, "project").arch.merge_lift == 0.5
    # and the polish round's merges, from cosine 0.4; the paper merges nothing
    assert RunConfig.compose({"arch": "moe"}, {}, "project").arch.late_merge_cos == 0.4
    assert RunConfig.compose({"arch": "moe"}, {}, "paper").arch.late_merge_cos == 1.0
    assert RunConfig.compose({"arch": "moe"}, {}, "paper").arch.merge_lift == 0.0
    assert RunConfig.compose({"arch": "tree", "levels": [8, 16]}, {}, "project").arch.merge_lift == 0.0
    assert ArchConfig(arch="moe").merge_lift == 0.0
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match=r"merge_lift must be in \[0, 1\)"):
            ArchConfig(arch="moe", merge_lift=bad)


def test_moe_expert_init_ingredients_are_the_projects_and_checked():
    """The expert-initialisation ingredients the project adopted are on in its preset, off in the paper's
    (which keeps the authors' random init), and a value outside its range is refused with the field named."""
    project = RunConfig.compose({"arch": "moe"}, {}, "project").arch
    paper = RunConfig.compose({"arch": "moe"}, {}, "paper").arch
    assert project.refit_parents and not paper.refit_parents
    # the offset: the project's shared offset and fold, the paper's none (and the mean where it has one)
    assert project.center and project.center_quantile == 0.05 and project.fold_density == 0.5
    assert not paper.center and paper.center_quantile is None and paper.fold_density == 1
    tree = RunConfig.compose({"arch": "tree", "levels": [8, 16]}, {}, "paper").arch
    assert tree.center_quantile is None
    # every expert redone at each round, clusters cut in two merged: the project's, not the paper's
    assert project.expert_reinit == "all" and project.child_separation == 2.0
    assert paper.expert_reinit == "starved" and paper.child_separation == 0
    assert project.revive_children_at == [0.7, 0.85] and paper.revive_children_at == []
    assert project.polish_at == [0.8] and paper.polish_at == []
    assert project.reseed_dead_parents and not paper.reseed_dead_parents
    # options that found more children on the synthetic family but cost explained variance or children on
    # SmolLM2: off in both
    for arch in (project, paper):
        assert 0.8 not in arch.expert_init_at
        assert not arch.expert_blind_to_parent and arch.promoted_share == 1
    for fields, message in [
        ({"expert_reinit": "some"}, "expert_reinit must be all or starved"),
        ({"child_separation": -1.0}, "child_separation must be >= 0"),
        ({"child_tightness": 1.5}, r"child_tightness must be in \[0, 1\]"),
        ({"promoted_share": -0.1}, r"promoted_share must be in \[0, 1\]"),
        ({"center_quantile": 1.5}, r"center_quantile must be in \[0, 1\] or null"),
        ({"fold_density": 0.0}, r"fold_density must be in \(0, 1\]"),
        ({"polish_at": [1.2]}, r"polish_at must hold fractions of the run in \(0, 1\)"),
    ]:
        with pytest.raises(ConfigError, match=message):
            ArchConfig(arch="moe", **fields)
