"""`hsae` is composed in the backend (the trainer's commands next to index/serve/export/import/demo/db), and
a server that is only browsed never imports torch: live inference loads on the first live request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import typer

from backend.cli import app
from tests.backend.api_fixtures import RUN_NAME, SynthRun, make_run, new_database, session_scope  # noqa: F401
from trainer import cli as trainer_cli

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": pythonpath}


def test_the_console_script_is_the_backend_cli_with_every_command():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"hsae": "backend.cli:main"}
    commands = set(typer.main.get_command(app).commands)
    assert commands == {
        "train", "eval", "encode", "index", "index-sae", "serve", "export", "import", "demo", "db"}
    assert set(typer.main.get_command(trainer_cli.app).commands) == {"train", "eval", "encode"}
    proc = subprocess.run([sys.executable, "-m", "backend.cli", "--help"], capture_output=True, text=True,
                          env=_env(), timeout=120)
    assert proc.returncode == 0 and "index" in proc.stdout and "train" in proc.stdout, proc.stderr


BROWSE = """
import json, sys
from fastapi.testclient import TestClient
from backend.cli import app as cli_app  # what `hsae serve` imports before serving
from backend.server import serve
from backend.app import create_app
from backend.settings import Settings

run = sys.argv[2]
statuses = []
with TestClient(create_app(Settings(database_url=sys.argv[1]))) as client:
    for path in ("/healthz", "/api/v1/runs", f"/api/v1/runs/{run}", f"/api/v1/runs/{run}/forest",
                 f"/api/v1/runs/{run}/features/0/3", f"/api/v1/runs/{run}/features/0/3/export",
                 f"/api/v1/runs/{run}/search?q=cat", "/", f"/runs/{run}", f"/runs/{run}/features/0/3"):
        statuses.append(client.get(path).status_code)
    before_live = [name for name in ("torch", "transformers", "trainer.checkpoint") if name in sys.modules]
    live = client.post(f"/api/v1/runs/{run}/activations", json={"text": "a cat"})
print(json.dumps({"statuses": statuses, "loaded": before_live, "live": live.status_code}))
"""


def test_a_browse_only_server_never_imports_torch(new_database):
    url = new_database("sqlite")
    with session_scope(url) as session:
        make_run(session, SynthRun())
    proc = subprocess.run([sys.executable, "-c", BROWSE, url, RUN_NAME], capture_output=True, text=True,
                          env=_env(), timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    assert answer["statuses"] == [200] * 10
    assert answer["loaded"] == []
    assert answer["live"] == 409  # the first live request loads the model code (this run has no checkpoint)
