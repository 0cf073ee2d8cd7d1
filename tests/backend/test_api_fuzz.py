"""Property-based fuzz of every operation in the OpenAPI document (schemathesis): generated requests, valid
and invalid, must never produce a 5xx, and every answer must conform to the document (status codes, content
types, response schemas). Each generated case is sent twice: as generated (mostly unknown runs: 404s) and
aimed at the synthetic run, so parameters and bodies reach the queries."""

from __future__ import annotations

import numpy as np
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from backend.app import create_app
from backend.live import LevelCodes, LiveService, PromptToken
from tests.backend.api_fixtures import RUN_NAME, WRITE_TOKEN, api_db_url, app_settings, auth, new_database  # noqa: F401

MAX_EXAMPLES = 12  # per operation and mode: the whole fuzz stays well under a minute


class EchoModel:
    """A stand-in live model: one feature per token and level (the real one is tested in test_api_live)."""

    device = "cpu"
    parents = [None, np.arange(16) // 4]

    def tokenize(self, text: str) -> list[PromptToken]:
        return [PromptToken(ord(ch) % 1000, i, i + 1) for i, ch in enumerate(text) if not ch.isspace()]

    def encode(self, prompts: list[list[int]]) -> list[list[LevelCodes]]:
        return [
            [
                LevelCodes(np.array([[t % 4] for t in p]), np.ones((len(p), 1), np.float32)),
                LevelCodes(np.array([[t % 16] for t in p]), np.full((len(p), 1), 0.5, np.float32)),
            ]
            for p in prompts
        ]


@pytest.fixture()
def fuzz_app(api_db_url):
    app = create_app(app_settings(api_db_url, write_token=WRITE_TOKEN, max_prompt_tokens=64))
    app.state.live = LiveService(app.state.settings, loader=lambda spec, device: EchoModel())
    with TestClient(app):  # runs the lifespan
        yield app


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors_and_conformant_answers(fuzz_app, mode):
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 13

    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.explicit, Phase.generate],
        )
        def check(case):
            case.call_and_validate(headers=auth())
            if "run" in (case.path_parameters or {}):  # again, aimed at the run that exists
                case.path_parameters["run"] = RUN_NAME
                response = case.call(headers=auth())
                assert response.status_code < 500, (case.method, case.formatted_path, response.text[:300])

        try:
            check()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE  # nothing about the operation can be made invalid
