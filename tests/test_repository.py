"""Checks on the repository itself rather than on what it runs: module sizes, and that the contracts the code
cites are documented inside the repository (docs/contracts.md), not in a file that lives beside a checkout."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FRONTEND_JS = REPO / "frontend" / "js"
CONTRACTS = REPO / "docs" / "contracts.md"
SKIPPED_DIRS = {".git", ".venv", "data", "test-artifacts", "node_modules", "__pycache__", "build", "dist"}

# A module past this many lines holds several concerns; split it the way frontend/js/forest/ is split.
MAX_JS_LINES = 400


def test_no_frontend_module_exceeds_the_size_budget():
    sizes = {p.relative_to(REPO).as_posix(): len(p.read_text().splitlines())
             for p in FRONTEND_JS.rglob("*.js")}
    assert sizes, "frontend/js holds the UI's modules"
    assert {path: n for path, n in sizes.items() if n > MAX_JS_LINES} == {}


# ---- contracts -------------------------------------------------------------------------------------------
def repository_files() -> list[Path]:
    """The files git tracks or would track (untracked but not ignored); every file but the usual build and
    data folders where this is not a git checkout."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO, capture_output=True, check=True, text=True,
        ).stdout.split("\0")
        files = [REPO / name for name in listed if name]
    except (OSError, subprocess.CalledProcessError):
        files = [p for p in REPO.rglob("*") if not SKIPPED_DIRS & set(p.relative_to(REPO).parts)]
    return [p for p in files if p.is_file()]


def text_files() -> dict[str, str]:
    out = {}
    for path in repository_files():
        try:
            out[path.relative_to(REPO).as_posix()] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # images and other binaries cite nothing
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def contract_headings() -> list[str]:
    assert CONTRACTS.is_file(), "docs/contracts.md documents the contracts the code cites"
    return re.findall(r"^#{1,6} +(.+?) *#*$", CONTRACTS.read_text(), flags=re.MULTILINE)


def test_no_file_cites_the_design_file_beside_the_checkout():
    needle = "DESIGN" + ".md"  # spelled apart so that this file does not cite it either
    citing = [path for path, text in text_files().items() if needle in text]
    assert citing == [], f"cite docs/contracts.md instead of {needle} in {citing}"


def test_every_cited_contract_section_exists():
    headings = contract_headings()
    anchors = {slug(h) for h in headings}
    numbered = {m.group(1) for h in headings if (m := re.match(r"Contract (\d+):", h))}
    assert numbered, "docs/contracts.md numbers its contracts (## Contract N: ...)"
    numbered_anchors = {slug(h.split(":")[0]) for h in headings}  # "contracts.md §Contract 2"
    broken = []
    for path, text in text_files().items():
        for anchor in re.findall(r"contracts\.md#([\w\-]+)", text):
            if anchor not in anchors:
                broken.append(f"{path}: contracts.md#{anchor}")
        for section in re.findall(r"contracts\.md\s*§\s*([^\n)\]`'\".,;]+)", text):
            if slug(section) not in anchors | numbered_anchors:
                broken.append(f"{path}: contracts.md \u00a7{section.strip()}")
        for number in re.findall(r"\bContract (\d+)\b", text):
            if number not in numbered:
                broken.append(f"{path}: Contract {number}")
        if path == "docs/contracts.md":
            broken += [f"{path}: (#{a})" for a in re.findall(r"\]\(#([\w\-]+)\)", text) if a not in anchors]
    assert broken == [], f"citations of sections that docs/contracts.md does not have: {broken}"


def contract_section(anchor: str) -> str:
    """The text of docs/contracts.md from the heading with that anchor to the next heading of its level."""
    text = CONTRACTS.read_text()
    for match in re.finditer(r"^(#{1,6}) +(.+?) *$", text, flags=re.MULTILINE):
        if slug(match.group(2)) == anchor:
            rest = text[match.end():]
            end = re.search(rf"^#{{1,{len(match.group(1))}}} ", rest, flags=re.MULTILINE)
            return rest[: end.start()] if end else rest
    raise AssertionError(f"docs/contracts.md has no section #{anchor}")


def test_contract_1_names_every_command_and_option_of_the_cli():
    import click
    import typer

    from backend.cli import app

    section = contract_section("contract-1-command-line")

    def walk(command: click.Command, words: tuple[str, ...]):
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                yield from walk(sub, (*words, name))
        else:
            yield words, command

    missing = []
    for words, command in walk(typer.main.get_command(app), ("hsae",)):
        if " ".join(words) not in section:
            missing.append(" ".join(words))
        for param in command.params:
            for opt in [*param.opts, *param.secondary_opts]:
                if opt.startswith("--") and opt != "--help" and opt not in section:
                    missing.append(f"{' '.join(words)} {opt}")
    assert missing == [], f"docs/contracts.md#contract-1-command-line lacks {missing}"


def test_contract_3_lists_every_api_path():
    from backend.app import create_app
    from backend.settings import Settings

    section = contract_section("contract-3-http-api")
    paths = create_app(Settings(database_url="sqlite:///unused.db")).openapi()["paths"]
    missing = [f"{method.upper()} {path}" for path, item in paths.items() for method in item
               if not re.search(rf"^{method.upper()} +{re.escape(path)}[\s?]", section, flags=re.MULTILINE)]
    assert missing == [], f"docs/contracts.md#contract-3-http-api lacks {missing}"
