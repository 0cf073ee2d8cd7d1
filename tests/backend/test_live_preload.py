"""Preloading live models (`hsae serve --live-preload`, the demo's default): the real model loads and runs
once while the app starts, so the first prompt neither loads nor waits; a name that cannot go live stops the
start with one clear error, before the server listens; "*" preloads the newest runs that load."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from backend.app import create_app
from backend.live import LiveService, LiveUnavailable
from backend.live.model import load_model
from backend.server import serve
from tests.backend.api_fixtures import SynthRun, app_settings, make_run, new_database, session_scope  # noqa: F401
from trainer.checkpoint import read_info, save_checkpoint
from trainer.config import ArchConfig
from trainer.models import build_model

RUN = "preloaded"
URL = f"/api/v1/runs/{RUN}/activations"


@pytest.fixture(scope="module")
def preload_db(lm, new_database, tmp_path_factory) -> str:
    """A freshly initialised small MoE H-SAE on the real SmolLM2's layer 6 (no training: loading is what
    is tested), a run without a checkpoint, and one whose checkpoint moved away."""
    model = build_model(ArchConfig(arch="moe", width=16, k=4, children=4, subspace=4), lm.d_model, seed=0)
    model.prepare(torch.randn(256, lm.d_model))
    run_dir = Path(tmp_path_factory.mktemp("preload")) / "run"
    save_checkpoint(run_dir, model, model_info={"name": lm.name, "layer": lm.layer, "hook": lm.hook_name},
                    training={"step": 0})
    url = new_database("sqlite")
    with session_scope(url) as session:
        make_run(session, SynthRun(name="no-checkpoint"))
        make_run(session, SynthRun(name="moved", model=lm.name, layer=lm.layer, checkpoint_path="/gone"))
        make_run(session, SynthRun(name=RUN, roots=16, children=4, model=lm.name, layer=lm.layer,
                                   digest=read_info(run_dir).digest, checkpoint_path=str(run_dir)))
    return url


class Counting:
    """The real loader and model, counting loads and forward passes."""

    def __init__(self):
        self.loads, self.encodes = 0, 0

    def load(self, spec, device):
        self.loads += 1
        model = load_model(spec, device, cpu_threads=1)
        encode = model.encode

        def counted(prompts):
            self.encodes += 1
            return encode(prompts)

        model.encode = counted
        return model


def start(url: str, wanted: str | None) -> tuple[TestClient, Counting]:
    settings = app_settings(url, live_device="cpu", live_preload=wanted or "")
    app = create_app(settings)
    counting = Counting()
    app.state.live = LiveService(settings, loader=counting.load)
    return TestClient(app), counting


@pytest.mark.parametrize("wanted", [RUN, "*"])  # "*": the newest two, of which "moved" cannot load
def test_preloaded_model_answers_the_first_prompt_without_loading(preload_db, wanted):
    client, counting = start(preload_db, wanted)
    started = time.perf_counter()
    with client:
        startup = time.perf_counter() - started
        assert (counting.loads, counting.encodes) == ((1, 2) if wanted == RUN else (2, 2))  # + 2 warm-ups
        times = []
        for _ in range(3):
            t = time.perf_counter()
            response = client.post(URL, json={"text": "The cat sat on the mat."})
            times.append(time.perf_counter() - t)
            assert response.status_code == 200, response.text
        assert (counting.loads, counting.encodes) == (1 if wanted == RUN else 2, 5)  # nothing loaded again
        assert times[0] < max(0.5 * startup, 3 * min(times[1:])), (startup, times)


def test_a_run_that_cannot_go_live_stops_the_start(preload_db):
    for wanted, message in (("nope", "no such run"), ("no-checkpoint", "no checkpoint path"),
                            ("moved", "does not exist"), (f"{RUN},moved,nope", "keeps 2")):
        client, _ = start(preload_db, wanted)
        with pytest.raises(LiveUnavailable, match=message), client:
            pass
        if message != "does not exist":  # `hsae serve` checks the names before it listens
            with pytest.raises(LiveUnavailable, match=message):
                serve(db_url=preload_db, port=1, live_preload=wanted)


def test_no_preload_loads_nothing_at_start(preload_db):
    client, counting = start(preload_db, None)
    with client:
        assert client.get("/healthz").status_code == 200
        assert counting.loads == 0
