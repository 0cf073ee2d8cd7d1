"""Shared fixtures. Every test session gets its own data directory; the converted model and the demo corpus
are shared with the repository's data/ folder through links, since building them is deterministic and
slow."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_SESSION_DATA = Path(tempfile.mkdtemp(prefix="hsae-test-data-"))
for shared in ("models", "corpora"):
    (REPO / "data" / shared).mkdir(parents=True, exist_ok=True)
    (_SESSION_DATA / shared).symlink_to(REPO / "data" / shared)
os.environ["HSAE_DATA_DIR"] = str(_SESSION_DATA)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach for a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _SESSION_DATA


def pytest_sessionfinish(session, exitstatus) -> None:
    """The session's data folder goes when the session ends (its model and corpus links only unlinked)."""
    shutil.rmtree(_SESSION_DATA, ignore_errors=True)


@pytest.fixture(scope="session")
def lm():
    """The real bundled SmolLM2-135M, layer 6 (early enough to keep tests fast)."""
    from trainer.lm import load_language_model

    return load_language_model(layer=6, device="cpu")


@pytest.fixture()
def tiny_corpus(tmp_path: Path) -> Path:
    """A folder of three short documents, one of which holds a special token literally."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("The cat sat on the mat. " * 12)
    (folder / "b.txt").write_text(
        "Paris is the capital of France, and Berlin is the capital of Germany. " * 6
    )
    (folder / "c.txt").write_text(
        "Numbers: 1 2 3 4 5 6 7 8 9 10. <|endoftext|> After the special token. " * 4
    )
    return folder
