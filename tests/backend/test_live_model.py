"""backend/live/model.py and transformer.py: a run's model is refused with a clear reason before the
language model is loaded (no checkpoint path, checkpoint gone, checkpoint changed since it was indexed)."""

from __future__ import annotations

import pytest

from backend.live.errors import LiveUnavailable
from backend.live.model import LiveRunSpec, load_model
from tests.trainer.helpers import D_IN, MODEL_INFO, tiny_arch_config
from trainer import checkpoint
from trainer.models import build_model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    model = build_model(tiny_arch_config("moe"), D_IN, seed=0)
    return checkpoint.save_checkpoint(tmp_path_factory.mktemp("live-model") / "run", model,
                                      model_info=MODEL_INFO, training={"step": 1})


def spec(path, digest) -> LiveRunSpec:
    return LiveRunSpec("r", "/nonexistent/language-model", 3, None if path is None else str(path), digest)


def test_a_run_without_a_checkpoint_path_is_unavailable():
    with pytest.raises(LiveUnavailable, match="no checkpoint path: re-index it"):
        load_model(spec(None, "d" * 64), "cpu")


def test_a_moved_checkpoint_is_unavailable(tmp_path):
    with pytest.raises(LiveUnavailable, match="does not exist"):
        load_model(spec(tmp_path / "gone", "d" * 64), "cpu")


def test_a_changed_checkpoint_is_unavailable_before_the_language_model_loads(run_dir):
    # the language model path does not exist: reaching it would fail with another message
    with pytest.raises(LiveUnavailable, match="changed since run 'r' was indexed"):
        load_model(spec(run_dir, "0" * 64), "cpu")
    with pytest.raises(LiveUnavailable, match="cannot load model"):
        load_model(spec(run_dir, checkpoint.read_info(run_dir).digest), "cpu")
