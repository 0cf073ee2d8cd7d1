"""The OpenAPI document is the API's contract: generated from the pydantic models, compared with a checked-in
snapshot so that any change to it is deliberate. After an intended change, refresh the snapshot with

    HSAE_UPDATE_OPENAPI_SNAPSHOT=1 .venv/bin/pytest tests/backend/test_api_openapi.py

and commit tests/backend/openapi.snapshot.json with the change."""

from __future__ import annotations

import json
import os
from pathlib import Path

from backend.app import create_app
from tests.backend.api_fixtures import app_settings

SNAPSHOT = Path(__file__).with_name("openapi.snapshot.json")

CONTRACT_3 = {
    ("get", "/api/v1/runs"),
    ("get", "/api/v1/runs/{run}/forest"),
    ("get", "/api/v1/runs/{run}/features/{level}/{index}"),
    ("get", "/api/v1/runs/{run}/features/{level}/{index}/children"),
    ("get", "/api/v1/runs/{run}/features/{level}/{index}/examples"),
    ("get", "/api/v1/runs/{run}/features/{level}/{index}/export"),
    ("put", "/api/v1/runs/{run}/features/{level}/{index}/annotation"),
    ("get", "/api/v1/runs/{run}/search"),
    ("post", "/api/v1/runs/{run}/activations"),
    ("get", "/healthz"),
}


def current_document() -> dict:
    return create_app(app_settings("sqlite:///unused.db")).openapi()


def test_openapi_matches_snapshot():
    document = json.loads(json.dumps(current_document()))
    if os.environ.get("HSAE_UPDATE_OPENAPI_SNAPSHOT"):
        SNAPSHOT.write_text(json.dumps(document, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    assert document == json.loads(SNAPSHOT.read_text()), (
        "the OpenAPI document changed; if intended, refresh the snapshot (see this module's docstring)"
    )


def test_contract_3_paths_exist():
    paths = current_document()["paths"]
    operations = {(method, path) for path, item in paths.items() for method in item}
    assert CONTRACT_3 <= operations


def test_every_error_is_documented_as_error_body():
    for path, item in current_document()["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")):
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (method, path, status)
