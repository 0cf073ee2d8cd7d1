"""Dependencies run one way, backend → trainer: no trainer module imports the backend or a database library.
Indexing in the trainer ends at plain data; writing it to a database is the backend's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

IMPORT_EVERYTHING = """
import importlib, json, pkgutil, sys
import trainer
for info in pkgutil.walk_packages(trainer.__path__, "trainer."):
    importlib.import_module(info.name)
print(json.dumps(sorted(name for name in sys.modules
                        if name.split(".")[0] in ("backend", "sqlalchemy", "alembic", "fastapi", "psycopg"))))
"""


def test_no_trainer_module_imports_the_backend_or_sqlalchemy():
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath}
    proc = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING], capture_output=True, text=True, env=env,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_no_trainer_source_names_the_backend():
    """Lazy imports inside functions count too: the subprocess test above only sees module-level ones."""
    offenders = [
        str(path.relative_to(REPO))
        for path in sorted((REPO / "trainer").rglob("*.py"))
        if any(word in path.read_text() for word in ("from backend", "import backend", "sqlalchemy"))
    ]
    assert offenders == []
