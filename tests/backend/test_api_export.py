"""Contract 4: the exported subtree document against its JSON Schema, depth and examples parameters, and an
export → import round trip into a second database holding the same run, through the API and the CLI's
functions; mismatching checkpoints are refused with a clear message."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from backend import export
from backend.api.schemas import SubtreeDocument, SubtreeNode
from backend.app import create_app
from backend.db.models import AnnotationEvent, Feature
from tests.backend.api_fixtures import (  # noqa: F401
    RUN_NAME,
    WRITE_TOKEN,
    SynthRun,
    api_db_url,
    app_settings,
    auth,
    client,
    make_run,
    new_database,
    session_scope,
)
from tests.backend.test_api_browse import assert_error

RUN = f"/api/v1/runs/{RUN_NAME}"
SCHEMA = json.loads(export.SCHEMA_PATH.read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker())
SYNTH = SynthRun()


def test_schema_file_is_a_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_committed_schema_is_the_models_schema():
    """One definition of the document: the pydantic models. The committed JSON Schema is generated from
    them."""
    assert SCHEMA == export.document_schema(), (
        "the models changed: regenerate with `python -m backend.export`"
    )


def test_export_is_built_from_the_models(api_db_url):
    with session_scope(api_db_url) as session:
        run = export.queries.get_run(session, RUN_NAME)
        document = export.build_subtree(session, run, 0, 3, depth=1)
    assert isinstance(document, SubtreeDocument) and isinstance(document.root.children[0], SubtreeNode)


@pytest.mark.parametrize("level, index", [(0, 2**31), (0, 2**64), (-1, 0), (65, 0), (0, -1)])
def test_export_refuses_addresses_no_feature_can_have(client, api_db_url, level, index):
    """The command line's export takes the API's bounds on level and index: a clear answer, never the
    database's overflow error."""
    with pytest.raises(export.UnknownFeatureError, match=f"no feature {level}/{index}"):
        export.export_subtree(RUN_NAME, level, index, db_url=api_db_url)
    if level >= 0 and index >= 0:
        assert_error(client.get(f"{RUN}/features/{level}/{index}/export"), 422)


def test_export_document_matches_schema(client):
    doc = client.get(f"{RUN}/features/0/3/export").json()
    VALIDATOR.validate(doc)
    assert doc["format"] == "hsae-subtree" and doc["version"] == 1 and doc["depth"] is None
    assert doc["run"] == {
        "name": RUN_NAME,
        "model": SYNTH.model,
        "layer": SYNTH.layer,
        "hook": f"blocks.{SYNTH.layer}.hook_resid_post",
        "arch": "moe",
        "checkpoint_digest": SYNTH.digest,
        "level_widths": SYNTH.level_widths,
        "n_tokens": 10_000,
    }
    root = doc["root"]
    assert (root["level"], root["index"]) == (0, 3) and root["stats"]["child_count"] == SYNTH.children
    assert root["top_tokens"]["positive"][0] == {"token": "river", "logit": 5.0}
    assert [c["index"] for c in root["children"]] == [12, 13, 14, 15]
    assert all(c["children"] == [] and len(c["examples"]) == 5 for c in root["children"])
    assert [(e["kind"], e["bucket"], e["rank"]) for e in root["examples"]][:2] == [
        ("top", 0, 0),
        ("top", 0, 1),
    ]
    assert SubtreeDocument.model_validate(doc).root.children[0].index == 12


def test_export_depth_and_examples(client):
    shallow = client.get(f"{RUN}/features/0/3/export", params={"depth": 0, "examples": False}).json()
    VALIDATOR.validate(shallow)
    assert shallow["depth"] == 0 and shallow["includes_examples"] is False
    assert shallow["root"]["children"] == [] and shallow["root"]["examples"] == []
    leaf = client.get(f"{RUN}/features/1/13/export", params={"depth": 3}).json()
    assert leaf["root"]["children"] == [] and len(leaf["root"]["examples"]) == 5
    for params in ({"depth": -1}, {"depth": "all"}, {"examples": "maybe"}):
        assert_error(client.get(f"{RUN}/features/0/3/export", params=params), 422)
    assert_error(client.get("/api/v1/runs/nope/features/0/3/export"), 404)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("root"),
        lambda d: d.update(format="something-else"),
        lambda d: d.update(version=2),
        lambda d: d["run"].pop("checkpoint_digest"),
        lambda d: d["root"].update(level=-1),
        lambda d: d["root"].update(tags=[""]),
        lambda d: d["root"].update(label="a\x00b"),
        lambda d: d["root"].update(children="none"),
        lambda d: d["root"].update(top_tokens={"positive": [{"token": "a"}], "negative": []}),
    ],
)
def test_schema_and_model_reject_the_same_broken_documents(client, mutate):
    doc = client.get(f"{RUN}/features/0/3/export", params={"depth": 0}).json()
    broken = copy.deepcopy(doc)
    mutate(broken)
    with pytest.raises(jsonschema.ValidationError):
        VALIDATOR.validate(broken)
    with pytest.raises(export.DocumentError):
        export.parse_document(broken)
    assert_error(client.post(f"{RUN}/import", json=broken, headers=auth()), 422)


@pytest.fixture()
def second_db(api_db_url, new_database) -> str:
    """Another installation: a fresh database holding the same run (same checkpoint), not annotated."""
    backend = "sqlite" if api_db_url.startswith("sqlite") else "postgres"
    url = new_database(backend)
    with session_scope(url) as session:
        make_run(session)
        session.query(Feature).update({"label": None, "note": None, "tags": []})
    return url


def annotations(url: str, keys) -> dict:
    with session_scope(url) as session:
        rows = session.execute(
            select(Feature.level, Feature.idx, Feature.label, Feature.note, Feature.tags)
        ).all()
    return {(r.level, r.idx): (r.label, r.note, r.tags) for r in rows if (r.level, r.idx) in keys}


def event_count(url: str) -> int:
    with session_scope(url) as session:
        return session.scalar(select(func.count()).select_from(AnnotationEvent))


def test_round_trip_through_the_api(client, api_db_url, second_db):
    client.put(
        f"{RUN}/features/0/7/annotation",
        json={"label": "exported root", "note": "n", "tags": ["a"]},
        headers=auth(),
    )
    client.put(
        f"{RUN}/features/1/29/annotation",
        json={"label": "exported child", "tags": ["b", "c"]},
        headers=auth(),
    )
    doc = client.get(f"{RUN}/features/0/7/export").json()
    keys = {(0, 7), (1, 28), (1, 29), (1, 30), (1, 31)}
    with TestClient(create_app(app_settings(second_db, write_token=WRITE_TOKEN))) as other:
        response = other.post(f"{RUN}/import", json=doc, headers=auth())
        assert response.status_code == 200, response.text
        assert response.json() == {"run": RUN_NAME, "features": 5, "applied": 2, "unchanged": 0, "skipped": 3}
        assert annotations(second_db, keys) == annotations(api_db_url, keys)
        assert other.get(f"{RUN}/features/1/29").json()["label"] == "exported child"
        history = other.get(f"{RUN}/features/0/7/annotation/history").json()["items"]
        assert [(e["author"], e["old_label"], e["new_label"]) for e in history] == [
            ("import:token", None, "exported root")
        ]
        again = other.post(f"{RUN}/import", json=doc, headers=auth()).json()
        assert (again["applied"], again["unchanged"]) == (0, 2) and event_count(second_db) == 2
        # an import never erases: local work on a node the document leaves unannotated survives
        other.put(f"{RUN}/features/1/30/annotation", json={"label": "local"}, headers=auth())
        other.post(f"{RUN}/import", json=doc, headers=auth())
        assert other.get(f"{RUN}/features/1/30").json()["label"] == "local"


def test_import_refuses_another_checkpoint(client):
    doc = client.get(f"{RUN}/features/0/3/export", params={"depth": 0}).json()
    doc["root"]["label"] = "should not land"
    for field, value in (
        ("checkpoint_digest", "0" * 64),
        ("model", "other-lm"),
        ("layer", 9),
        ("arch", "tree"),
    ):
        other = copy.deepcopy(doc)
        other["run"][field] = value
        body = assert_error(client.post(f"{RUN}/import", json=other, headers=auth()), 409, "conflict")
        assert "different checkpoint" in body["detail"] and field.split("_")[0] in body["detail"]
    missing = copy.deepcopy(doc)
    missing["root"].update(level=1, index=10_000)
    body = assert_error(client.post(f"{RUN}/import", json=missing, headers=auth()), 409)
    assert "no feature 1/10000" in body["detail"]
    bad_nesting = copy.deepcopy(doc)
    bad_nesting["root"]["children"] = [dict(doc["root"], level=0, index=1, children=[])]
    assert (
        "one level down"
        in assert_error(client.post(f"{RUN}/import", json=bad_nesting, headers=auth()), 422)["detail"]
    )
    assert client.get(f"{RUN}/features/0/3").json()["label"] is None


def test_import_needs_the_write_token(client):
    doc = client.get(f"{RUN}/features/0/3/export", params={"depth": 0}).json()
    assert_error(client.post(f"{RUN}/import", json=doc), 401)
    assert_error(client.post("/api/v1/runs/nope/import", json=doc, headers=auth()), 404)


def test_cli_functions_round_trip(client, api_db_url, second_db, tmp_path):
    client.put(f"{RUN}/features/0/9/annotation", json={"label": "cli root"}, headers=auth())
    doc = export.export_subtree(RUN_NAME, 0, 9, depth=1, include_examples=False, db_url=api_db_url)
    api_doc = client.get(f"{RUN}/features/0/9/export", params={"depth": 1, "examples": False}).json()
    assert {**doc, "exported_at": None} == {**api_doc, "exported_at": None}
    path = tmp_path / "subtree.json"
    export.write_document(doc, path)
    result = export.import_document(path, db_url=second_db)
    assert (result.applied, result.features) == (1, 5)
    assert annotations(second_db, {(0, 9)}) == {(0, 9): ("cli root", None, [])}
    with session_scope(second_db) as session:
        author = session.scalar(select(AnnotationEvent.author).where(AnnotationEvent.idx == 9))
    assert author == "import:subtree.json"
    doc["run"]["checkpoint_digest"] = "f" * 64
    with pytest.raises(export.RunMismatchError, match="no run holds the document's checkpoint"):
        export.import_document(doc, db_url=second_db)
    with pytest.raises(export.UnknownRunError):
        export.import_document(doc, db_url=second_db, run_name="nope")
    with pytest.raises(export.UnknownRunError):
        export.export_subtree("nope", 0, 0, db_url=api_db_url)
    with pytest.raises(export.UnknownFeatureError):
        export.export_subtree(RUN_NAME, 0, 10_000, db_url=api_db_url)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(export.DocumentError, match="not a JSON document"):
        export.import_document(tmp_path / "broken.json", db_url=second_db)


def test_cli_import_picks_the_run_of_the_same_checkpoint(client, api_db_url, second_db):
    with session_scope(second_db) as session:
        make_run(session, SynthRun(name="synth-copy"))  # the same checkpoint under another name
    doc = client.get(f"{RUN}/features/0/11/export", params={"depth": 0}).json()
    doc["root"]["label"] = "picked"
    assert export.import_document(doc, db_url=second_db).run == RUN_NAME  # the document's own run first
    doc["run"]["name"] = "renamed-elsewhere"
    with pytest.raises(export.RunMismatchError, match="several runs hold this checkpoint"):
        export.import_document(doc, db_url=second_db)
    assert export.import_document(doc, db_url=second_db, run_name="synth-copy").applied == 1
