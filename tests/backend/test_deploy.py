"""Deployment as documented: the compose file is consistent with the CLI and the Dockerfile, and the start
sequence it runs (migrate, index, serve, fetch over HTTP) works for real without Docker, on SQLite (the demo
path) and PostgreSQL (the compose path). The same test is the demo path end to end at a tiny size."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import typer
import yaml

from backend.cli import app

REPO = Path(__file__).resolve().parents[2]
HSAE = [sys.executable, "-m", "backend.cli"]


def _cli_commands() -> dict:
    group = typer.main.get_command(app)
    return {name: cmd for name, cmd in group.commands.items()}


def _check_hsae_command(argv: list[str]) -> None:
    assert argv[0] == "hsae", argv
    commands = _cli_commands()
    assert argv[1] in commands, f"`hsae {argv[1]}` is not a command"
    cmd = commands[argv[1]]
    if hasattr(cmd, "commands"):  # a group such as `db`
        assert argv[2] in cmd.commands, f"`hsae {argv[1]} {argv[2]}` is not a command"
        cmd = cmd.commands[argv[2]]
    options = {opt for param in cmd.params for opt in getattr(param, "opts", [])}
    for arg in argv[2:]:
        if arg.startswith("--"):
            assert arg in options, f"`hsae {argv[1]}` has no option {arg}"


def test_compose_file_is_consistent():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"db", "migrate", "backend"} <= set(services)
    db = services["db"]
    assert db["image"].startswith("postgres:")
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])
    volume = db["volumes"][0].split(":")[0]
    assert volume in compose["volumes"], "the database volume must be a named volume"
    env = db["environment"]
    expected_url = (f"postgresql+psycopg://{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}@db:5432/"
                    f"{env['POSTGRES_DB']}")
    for name in ("migrate", "backend", "backend-gpu", "index"):
        service = services[name]
        assert service["environment"]["HSAE_DATABASE_URL"] == expected_url, name
        argv = service.get("command") or service.get("entrypoint")
        _check_hsae_command(argv)
    assert services["migrate"]["command"] == ["hsae", "db", "upgrade"]
    assert services["migrate"]["depends_on"]["db"]["condition"] == "service_healthy"
    assert services["backend"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["backend"]["ports"] == ["8000:8000"]
    assert "--port" in services["backend"]["command"] and "8000" in services["backend"]["command"]
    assert "/healthz" in " ".join(services["backend"]["healthcheck"]["test"])
    gpu = services["backend-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_dockerfile_copies_what_exists_and_runs_the_cli():
    lines = (REPO / "Dockerfile").read_text().splitlines()
    for line in lines:
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), f"Dockerfile copies {src}, which does not exist"
    cmd = next(line for line in lines if line.startswith("CMD "))
    _check_hsae_command(json.loads(cmd[4:]))
    assert any("torch==2.13.0" in line for line in lines) and any("constraints.txt" in line for line in lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*args, timeout=600):
    proc = subprocess.run([*HSAE, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("deploy-corpus")
    (corpus / "a.txt").write_text("The river flows to the sea. Boats sail on the river at dawn. " * 8)
    (corpus / "b.txt").write_text("Seven, eight, nine. Numbers count the days of the week. " * 8)
    run_dir = tmp_path_factory.mktemp("deploy-runs") / "tiny-moe"
    out = _run("train", "--arch", "moe", "--corpus", corpus, "--layer", 6, "--tokens", 400,
               "--width", 16, "--k", 4, "--children", 4, "--subspace", 4, "--steps", 20, "--batch", 64,
               "--out", run_dir, "--device", "cpu")
    assert out.strip().splitlines()[-1] == str(run_dir)
    _run("eval", run_dir, "--corpus", corpus, "--tokens", 200, "--device", "cpu")
    assert json.loads((run_dir / "metrics.json").read_text())["ce"]["ce_clean"] > 0
    return run_dir, corpus


def test_start_sequence_migrate_index_serve_fetch(tiny_run, empty_db_url):
    run_dir, corpus = tiny_run
    _run("db", "upgrade", "--db", empty_db_url)
    _run("index", run_dir, "--corpus", corpus, "--db", empty_db_url, "--name", "deployed", "--device", "cpu")
    port = _free_port()
    server = subprocess.Popen([*HSAE, "serve", "--db", empty_db_url, "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.3)
        runs = httpx.get(f"{base}/api/v1/runs").json()
        assert any(r["name"] == "deployed" for r in (runs["items"] if isinstance(runs, dict) else runs))
        forest = httpx.get(f"{base}/api/v1/runs/deployed/forest", params={"level": 0, "limit": 5})
        assert forest.status_code == 200
        feature = httpx.get(f"{base}/api/v1/runs/deployed/features/0/0")
        assert feature.status_code == 200 and feature.json()["level"] == 0
        page = httpx.get(f"{base}/runs/deployed/features/0/0")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        write = httpx.put(f"{base}/api/v1/runs/deployed/features/0/0/annotation", json={"label": "x"})
        assert write.status_code == 403  # not local mode and no token configured: writes refused
    finally:
        server.terminate()
        server.wait(timeout=30)
