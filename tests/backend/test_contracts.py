"""One home for each contract: which runs are visible (backend.db.models.visible_runs / hidden_runs) and the
bounds of a feature's level and index (backend.api.schemas). These read the sources: a second definition
would still pass every behavioural test until the two drift apart."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _sources(*folders: str) -> dict[str, str]:
    return {
        str(p.relative_to(REPO)): p.read_text() for f in folders for p in sorted((REPO / f).rglob("*.py"))
    }


def test_visibility_of_runs_is_defined_once():
    """The API's queries, the index writer and the demo all ask visible_runs()/hidden_runs()."""
    offenders = [path for path, text in _sources("backend", "trainer").items()
                 if "Run.complete" in text and path != "backend/db/models.py"]
    assert offenders == []
    sources = _sources("backend")
    for user in ("backend/queries.py", "backend/index/writer.py", "backend/demo.py"):
        assert "visible_runs(" in sources[user], user


def test_level_and_index_bounds_are_defined_once():
    pattern = re.compile(r"\ble=MAX_(LEVEL|INDEX)\b")
    offenders = [path for path, text in _sources("backend").items()
                 if pattern.search(text) and path != "backend/api/schemas.py"]
    assert offenders == []


def test_the_demo_trains_with_what_hsae_train_composes():
    """The demo's run is the project preset, as `hsae train` with the same sizes would make it (it once built
    its config by hand and so missed the preset's learning rate)."""
    from backend.demo import CPU_SIZE, GPU_SIZE, demo_run_config
    from trainer.config import PRESETS

    for size in (CPU_SIZE, GPU_SIZE):
        run_cfg = demo_run_config(size)
        assert run_cfg.arch.preset == "project" and run_cfg.arch.width == size.width
        assert run_cfg.train.lr == PRESETS["project"]["moe"]["train"]["lr"]
        assert run_cfg.arch.center and run_cfg.arch.expert_init_at
