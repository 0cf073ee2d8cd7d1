"""The `hsae` command line as a user runs it: a subprocess, its exit status, its last lines."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

HSAE = [sys.executable, "-m", "backend.cli"]


def hsae(*args, env_extra=None, timeout=600):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([*HSAE, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


def assert_one_line_error(proc, pattern):
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    import re

    assert re.search(pattern, lines[0]), lines[0]


@pytest.fixture()
def acts_file(tmp_path):
    rows = np.random.default_rng(0).standard_normal((2048, 32)).astype(np.float32)
    path = tmp_path / "acts.npy"
    np.save(path, rows)
    return path


def test_train_eval_encode_on_an_activations_file(tmp_path, acts_file):
    out = tmp_path / "run"
    proc = hsae("train", "--arch", "topk", "--activations", acts_file, "--width", 64, "--k", 4, "--steps", 20,
                "--batch", 128, "--out", out, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["format"] == "hsae-checkpoint" and cfg["arch"] == "topk" and cfg["d_in"] == 32

    proc = hsae("eval", out, "--activations", acts_file, "--tokens", 1000, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tokens"] == 1000 and metrics["levels"][0]["l0"] == pytest.approx(4.0)
    assert metrics["outliers"]["rows"] == 0 and metrics["outliers"]["max_norm_multiple"] == 10.0
    assert "explained variance" in proc.stdout

    codes = tmp_path / "codes.safetensors"
    proc = hsae("encode", out, "--activations", acts_file, "--out", codes, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    tensors = load_file(codes)
    assert tensors["level_0_indices"].shape == (2048, 4) and tensors["level_0_values"].shape == (2048, 4)
    assert tensors["level_0_indices"].dtype == np.int64 and tensors["level_0_indices"].max() < 64


def test_eval_after_training_on_a_corpus_scores_the_tokens_after_the_training_ones(tmp_path, tiny_corpus):
    """The run trained on the corpus's first 60 tokens; `hsae eval` extends the activation cache and scores
    the 40 after them. (The cache's one shard, extracted for the 60, used to be served as complete, so the
    held-out range came up short and eval fell back to the training tokens, saying held_out false.)"""
    env = {"HSAE_DATA_DIR": str(tmp_path / "data")}
    out = tmp_path / "run"
    proc = hsae("train", "--arch", "topk", "--corpus", tiny_corpus, "--layer", 6, "--tokens", 60,
                "--width", 64, "--k", 4, "--steps", 2, "--batch", 30, "--out", out, "--device", "cpu",
                env_extra=env)
    assert proc.returncode == 0, proc.stderr
    proc = hsae("eval", out, "--tokens", 40, "--device", "cpu", env_extra=env)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "metrics.json").read_text())["data"]
    assert data["held_out"] is True and data["eval_rows"] == [60, 100]


def test_encode_reads_the_whole_activations_file_unless_tokens_limits_it(tmp_path, acts_file):
    """The corpus default of 20,000 tokens must not cut a matrix file short; --tokens still limits it."""
    out = tmp_path / "run"
    assert hsae("train", "--arch", "topk", "--activations", acts_file, "--width", 16, "--k", 2, "--steps", 2,
                "--batch", 64, "--out", out, "--device", "cpu").returncode == 0
    big = tmp_path / "big.npy"
    np.save(big, np.random.default_rng(1).standard_normal((20_500, 32)).astype(np.float32))
    codes = tmp_path / "codes.safetensors"
    proc = hsae("encode", out, "--activations", big, "--out", codes, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert load_file(codes)["level_0_indices"].shape == (20_500, 2)
    assert "wrote 20500 rows" in proc.stdout
    proc = hsae("encode", out, "--activations", big, "--tokens", 300, "--out", codes, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert load_file(codes)["level_0_values"].shape == (300, 2)


def test_train_reads_the_whole_activations_file_unless_tokens_limits_it(tmp_path):
    """The corpus default of 200,000 tokens must not cut a matrix file short either."""
    big = tmp_path / "big.npy"
    np.save(big, np.random.default_rng(2).standard_normal((200_100, 8)).astype(np.float32))
    for tokens, rows in ((None, 200_100), (1_000, 1_000)):
        out = tmp_path / f"run-{tokens}"
        limit = ["--tokens", tokens] if tokens else []
        proc = hsae("train", "--arch", "topk", "--activations", big, "--width", 8, "--k", 2, "--steps", 1,
                    "--batch", 64, "--out", out, "--device", "cpu", *limit)
        assert proc.returncode == 0, proc.stderr
        assert json.loads((out / "cfg.json").read_text())["data"]["rows"] == rows


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--model", "/nonexistent/model"], r"cannot load model '/nonexistent/model'"),
        (["--layer", "99"], r"layer 99 is out of range .* 0\.\.29"),
        (["--corpus", "{empty}"], r"holds no \.txt or \.jsonl files"),
        (["--corpus", "{blank}"], r"yields no tokens"),
        (["--corpus", "{notext}"], r"docs\.jsonl:2: no string field 'text'"),
        (["--corpus", "{missing}"], r"does not exist"),
        (["--activations", "{rank3}"], r"2-D \[N, d\] matrix"),
        (["--activations", "{nan}"], r"NaN or inf"),
        (
            ["--activations", "{acts}", "--arch", "topk", "--width", "8", "--k", "16"],
            r"k .*16.* width .*8|width",
        ),
        (
            ["--activations", "{acts}", "--arch", "moe", "--width", "8", "--k", "2", "--subspace", "64"],
            r"subspace",
        ),
        (
            ["--activations", "{acts}", "--arch", "moe", "--width", "8", "--k", "2", "--children", "0"],
            r"children",
        ),
        (["--activations", "{acts}", "--arch", "tree", "--levels", "64,32"], r"increasing"),
        (["--activations", "{acts}", "--arch", "tree", "--levels", "a,b"], r"comma-separated integers"),
    ],
)
def test_bad_input_is_one_line_and_overwrites_nothing(tmp_path, acts_file, args, pattern):
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("  \n")
    (tmp_path / "docs.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    np.save(tmp_path / "rank3.npy", np.zeros((4, 4, 4), np.float32))
    np.save(tmp_path / "nan.npy", np.array([[0.0, np.nan]], np.float32))
    paths = {"empty": tmp_path / "empty", "blank": tmp_path / "blank", "notext": tmp_path / "docs.jsonl",
             "missing": tmp_path / "missing.txt", "rank3": tmp_path / "rank3.npy",
             "nan": tmp_path / "nan.npy", "acts": acts_file}
    out = tmp_path / "existing-run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    before = sorted(p.name for p in out.iterdir())
    proc = hsae("train", *[a.format(**paths) for a in args], "--tokens", 2000, "--steps", 2, "--batch", 64,
                "--device", "cpu", "--out", out, env_extra={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(proc, pattern)
    assert sorted(p.name for p in out.iterdir()) == before
    assert (out / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("source", ["npy", "safetensors", "corpus", "short corpus"])
def test_batch_larger_than_the_data_is_one_line_and_writes_nothing(tmp_path, acts_file, tiny_corpus, source):
    """Every activation source: exit status 2, one error line, no run directory. A corpus asked for fewer
    tokens than a batch is refused before the model loads; one that yields fewer rows than asked for is
    refused once they are known (after the model's own progress bars)."""
    if source == "npy":
        args = ["--activations", acts_file]
    elif source == "safetensors":
        from safetensors.numpy import save_file

        path = tmp_path / "acts.safetensors"
        save_file({"activations": np.load(acts_file)}, str(path))
        args = ["--activations", path]
    else:
        args = ["--corpus", tiny_corpus, "--layer", 6, "--tokens", 300 if source == "corpus" else 100_000]
    out = tmp_path / "run"
    proc = hsae("train", "--arch", "topk", *args, "--width", 64, "--k", 4, "--batch", 4096, "--steps", 2,
                "--out", out, "--device", "cpu")
    data = {"corpus": "300 tokens", "short corpus": r"\d+ rows"}.get(source, "2048 rows")
    assert_one_line_error(proc, rf"batch size 4096 exceeds the {data} of activations")
    assert proc.returncode == 2 and not out.exists()
    if source != "short corpus":
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_damaged_and_foreign_checkpoints(tmp_path, acts_file):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "cfg.json").write_text(json.dumps({"d_sae": 16, "d_in": 8}))
    assert_one_line_error(hsae("eval", foreign, "--activations", acts_file), r"not an HSAE checkpoint")
    assert_one_line_error(hsae("eval", tmp_path / "nowhere", "--activations", acts_file), r"does not exist")
    assert_one_line_error(hsae("index", foreign, "--tokens", 100), r"not an HSAE checkpoint")


def test_index_refuses_an_unreachable_database(tmp_path, acts_file):
    out = tmp_path / "run"
    assert hsae("train", "--arch", "topk", "--activations", acts_file, "--width", 16, "--k", 2, "--steps", 2,
                "--batch", 64, "--out", out, "--device", "cpu").returncode == 0
    proc = hsae("index", out, "--db", "postgresql://nobody@127.0.0.1:1/nothing")
    assert_one_line_error(proc, r"cannot connect to postgresql")
    old = tmp_path / "old.db"
    url = f"sqlite:///{old}"
    from backend.db.session import downgrade, upgrade

    upgrade(url)
    downgrade(url, "0001")
    before = old.read_bytes()
    proc = hsae("index", out, "--db", url)
    assert_one_line_error(proc, r"database at revision 0001, code expects \w+: run `hsae db upgrade")
    assert old.read_bytes() == before
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    assert_one_line_error(hsae("index", out, "--db", fresh), r"revision <none> \(empty database\)")
    assert hsae("db", "upgrade", "--db", fresh).returncode == 0
    assert_one_line_error(hsae("index", out, "--db", fresh), r"trained without a language model")


def test_preset_is_applied_and_recorded(tmp_path, acts_file):
    """`--preset paper` gives each paper's settings; the project preset is the default; both land in cfg.json,
    and flags still override a preset's fields."""
    runs = {}
    for preset in ("paper", None):
        out = tmp_path / f"run-{preset}"
        args = ["train", "--arch", "moe", "--activations", acts_file, "--width", 16, "--k", 2,
                "--children", 4, "--steps", 10, "--batch", 128, "--out", out, "--device", "cpu"]
        proc = hsae(*args, *(["--preset", preset] if preset else []))
        assert proc.returncode == 0, proc.stderr
        runs[preset] = json.loads((out / "cfg.json").read_text())
    paper, project = runs["paper"], runs[None]
    assert paper["arch_config"]["preset"] == "paper" and project["arch_config"]["preset"] == "project"
    assert paper["arch_config"]["center"] is False and paper["arch_config"]["child_l1"] == "all"
    assert paper["arch_config"]["expert_init_at"] == [] and paper["training"]["lr"] == 5e-4
    assert project["arch_config"]["center"] is True and project["training"]["lr"] == 2e-3
    assert paper["normalization"]["centered"] is False and project["normalization"]["centered"] is True

    out = tmp_path / "run-lr"
    proc = hsae("train", "--arch", "moe", "--activations", acts_file, "--width", 16, "--k", 2, "--steps", 5,
                "--batch", 128, "--out", out, "--device", "cpu", "--preset", "paper", "--lr", 1e-3)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "cfg.json").read_text())["training"]["lr"] == 1e-3


def test_unknown_preset_is_one_line(tmp_path, acts_file):
    out = tmp_path / "run"
    proc = hsae("train", "--arch", "moe", "--activations", acts_file, "--preset", "mine", "--out", out)
    assert_one_line_error(proc, r"preset must be one of project, paper")
    assert proc.returncode == 2 and not out.exists()
