import json

import pytest

from trainer.corpus import describe, iter_documents
from trainer.errors import HSAEError


def test_text_file(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("hello world")
    assert [(d.id, d.text) for d in iter_documents(str(f))] == [("one.txt", "hello world")]


def test_folder_is_read_recursively_in_order(tiny_corpus):
    (tiny_corpus / "sub").mkdir()
    (tiny_corpus / "sub" / "d.txt").write_text("nested")
    (tiny_corpus / "ignored.bin").write_bytes(b"\x00\x01")
    ids = [d.id for d in iter_documents(str(tiny_corpus))]
    assert ids == ["a.txt", "b.txt", "c.txt", "sub/d.txt"]


def test_jsonl(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text(json.dumps({"id": "x", "text": "first"}) + "\n\n" + json.dumps({"text": "second"}) + "\n")
    docs = list(iter_documents(str(f)))
    assert [(d.id, d.text) for d in docs] == [("x", "first"), ("docs.jsonl:3", "second")]


def test_jsonl_line_without_text_names_the_line(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(HSAEError, match=r"docs.jsonl:2: no string field 'text'"):
        list(iter_documents(str(f)))


def test_jsonl_bad_json_names_the_line(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text("{not json\n")
    with pytest.raises(HSAEError, match=r"docs.jsonl:1: not valid JSON"):
        list(iter_documents(str(f)))


def test_missing_and_empty_corpora(tmp_path):
    with pytest.raises(HSAEError, match="does not exist"):
        list(iter_documents(str(tmp_path / "nope.txt")))
    with pytest.raises(HSAEError, match="does not exist"):
        describe(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(HSAEError, match="holds no .txt or .jsonl files"):
        list(iter_documents(str(tmp_path / "empty")))


def test_hub_dataset_unreachable_is_a_clear_error():
    with pytest.raises(HSAEError, match="cannot load dataset 'no-such/dataset' from the Hugging Face hub"):
        list(iter_documents("hf:no-such/dataset:train"))


def test_fingerprint_changes_with_content(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one")
    before = describe(str(f))["fingerprint"]
    f.write_text("one two")
    assert describe(str(f))["fingerprint"] != before


def test_demo_corpus_has_both_sources_and_licences(data_dir):
    docs = list(iter_documents("demo"))
    sources = {d.id.split(":")[0] for d in docs}
    assert sources == {"wikipedia", "sotu"}
    assert sum(d.id.startswith("sotu:") for d in docs) == 233
    assert sum(len(d.text.split()) for d in docs) > 2_000_000
    assert not any("[[" in d.text or "{{" in d.text for d in docs if d.id.startswith("wikipedia:"))
    licences = json.loads((data_dir / "corpora" / "demo" / "LICENSES.json").read_text())
    assert set(licences) == {"wikipedia", "sotu"} and all(v["licence"] for v in licences.values())
    assert [d.id.split(":")[0] for d in docs[:4]] == ["wikipedia", "sotu", "wikipedia", "sotu"]
