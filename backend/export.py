"""Contract 4 (docs/contracts.md#contract-4-exported-subtree): a feature's subtree as a portable document, and
applying such a document's annotations.

    {"format": "hsae-subtree", "version": 1, "exported_at", "depth", "includes_examples",
     "run": {name, model, layer, hook, arch, checkpoint_digest, level_widths, n_tokens},
     "root": {"level", "index", "label", "note", "tags", "stats", "top_tokens", "examples",
              "children": [...]}}

The pydantic models in backend/api/schemas (`SubtreeDocument` and its parts) are the one definition: an
export is built as those models, an import is validated by them, and backend/schemas/hsae-subtree.schema.json
is their JSON Schema (`document_schema()`; a test checks that the committed file equals it; regenerate it
with `python -m backend.export`). The API's export and import and `hsae export` / `hsae import` all come
here.

An import applies annotations only: a node with a label, a note or tags replaces that feature's annotation
(with a history event); a node with none is skipped, so an import never erases work done since the export.
It needs a run of the same checkpoint: same model, layer, architecture and checkpoint digest.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Row
from sqlalchemy.orm import Session

from backend import queries
from backend.api import views
from backend.api.schemas import (
    ImportResult,
    SubtreeDocument,
    SubtreeExample,
    SubtreeNode,
    SubtreeRun,
    SubtreeStats,
    SubtreeTopTokens,
    TopToken,
    is_feature_address,
)
from backend.db.session import open_database, session_factory
from backend.settings import get_settings
from trainer.errors import HSAEError

FORMAT = "hsae-subtree"
VERSION = 1
SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "hsae-subtree.schema.json"
SCHEMA_HEADER = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://hsae-forest.invalid/schemas/hsae-subtree.schema.json",
    "title": "HSAE Forest exported subtree (Contract 4)",
    "description": (
        "A feature of an indexed HSAE run and its descendants, with annotations, statistics, top output "
        "tokens and examples. `hsae import` and POST /api/v1/runs/{run}/import apply its annotations to a "
        "run of the same checkpoint (model, layer, arch, checkpoint_digest). Level 0 is the top of the "
        "forest; every child is one level below its parent."
    ),
}


def document_schema() -> dict[str, Any]:
    """The JSON Schema of the document: the pydantic models' own, under a header naming the contract."""
    schema = SubtreeDocument.model_json_schema()
    for key in SCHEMA_HEADER:
        schema.pop(key, None)
    return {**SCHEMA_HEADER, **schema}


def write_schema(path: Path = SCHEMA_PATH) -> None:
    path.write_text(json.dumps(document_schema(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


class UnknownRunError(HSAEError):
    """No visible run of that name."""


class UnknownFeatureError(HSAEError):
    """The run has no feature at that level and index."""


class DocumentError(HSAEError):
    """The document is not a valid hsae-subtree document."""


class RunMismatchError(HSAEError):
    """The document comes from a different checkpoint than the run it would be applied to."""


# ---- export ----------------------------------------------------------------------------------------------
IDENTITY_FIELDS = ("name", "model", "layer", "hook", "arch", "checkpoint_digest", "level_widths", "n_tokens")


def run_identity(run: Row) -> SubtreeRun:
    """The run as the document names it: the API's run summary without what is local to one server."""
    summary = views.run_summary(run)
    return SubtreeRun(**{key: summary[key] for key in IDENTITY_FIELDS})


def build_subtree(
    session: Session,
    run: Row,
    level: int,
    index: int,
    *,
    depth: int | None = None,
    include_examples: bool = True,
) -> SubtreeDocument:
    """The document for feature (level, index) and its descendants `depth` levels down (None: all)."""
    if not is_feature_address(level, index):  # no feature can live there, and the database could not say so
        raise UnknownFeatureError(f"run {run.name!r} has no feature {level}/{index}")
    root_row = queries.get_subtree_root(session, run.id, level, index)
    if root_row is None:
        raise UnknownFeatureError(f"run {run.name!r} has no feature {level}/{index}")
    root = _node(root_row)
    frontier = {index: root}
    node_level, remaining = level, depth
    while frontier:
        if include_examples:
            for row in queries.get_examples_of(session, run.id, node_level, sorted(frontier)):
                frontier[row.idx].examples.append(_example(row))
        if remaining == 0:
            break
        parents = sorted(idx for idx, node in frontier.items() if node.stats.child_count)
        children = queries.get_children_of(session, run.id, node_level, parents) if parents else []
        next_frontier: dict[int, SubtreeNode] = {}
        for row in children:
            child = _node(row)
            frontier[row.parent_idx].children.append(child)
            next_frontier[row.idx] = child
        frontier, node_level = next_frontier, node_level + 1
        remaining = None if remaining is None else remaining - 1
    return SubtreeDocument(
        format=FORMAT,
        version=VERSION,
        exported_at=datetime.now(UTC),
        depth=depth,
        includes_examples=include_examples,
        run=run_identity(run),
        root=root,
    )


def _node(row: Any) -> SubtreeNode:
    return SubtreeNode(
        level=row.level,
        index=row.idx,
        label=row.label,
        note=row.note,
        tags=list(row.tags or []),
        stats=SubtreeStats(
            fire_count=row.fire_count,
            density=row.density,
            max_act=row.max_act,
            mean_act=row.mean_act,
            child_count=row.child_count,
        ),
        top_tokens=SubtreeTopTokens(
            positive=[TopToken(token=token, logit=logit) for token, logit in row.top_positive],
            negative=[TopToken(token=token, logit=logit) for token, logit in row.top_negative],
        ),
        examples=[],
        children=[],
    )


def _example(row: Any) -> SubtreeExample:
    return SubtreeExample(
        kind=row.kind,
        bucket=row.bucket,
        rank=row.rank,
        doc_id=row.doc_id,
        start=row.start,
        tokens=list(row.tokens),
        values=list(row.token_values),
        max_value=row.max_value,
        max_position=row.max_position,
    )


# ---- import ----------------------------------------------------------------------------------------------
def parse_document(data: Any) -> SubtreeDocument:
    """A document (parsed JSON) checked against Contract 4; DocumentError says what is wrong."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DocumentError(f'not an {FORMAT} document: it needs "format": "{FORMAT}"')
    if data.get("version") != VERSION:
        raise DocumentError(
            f"unsupported {FORMAT} version {data.get('version')!r}: this hsae reads version {VERSION}"
        )
    try:
        return SubtreeDocument.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in issue['loc'])}: {issue['msg']}" for issue in err.errors()[:5]
        )
        raise DocumentError(f"invalid {FORMAT} document: {problems}") from None
    except RecursionError:
        raise DocumentError(f"invalid {FORMAT} document: nested too deeply") from None


def check_same_checkpoint(run: Row, document: SubtreeDocument) -> None:
    source = document.run
    ours = (run.model_name, run.layer, run.arch, run.checkpoint_digest)
    theirs = (source.model, source.layer, source.arch, source.checkpoint_digest)
    if ours != theirs:
        names = ("model", "layer", "arch", "checkpoint digest")
        differences = ", ".join(
            f"{name} {a!r} (document) vs {b!r} (run)" for name, a, b in zip(names, theirs, ours) if a != b
        )
        raise RunMismatchError(
            f"the document comes from a different checkpoint than run {run.name!r}: {differences}"
        )


def apply_document(session: Session, run: Row, document: SubtreeDocument, author: str) -> ImportResult:
    """Apply the document's annotations to `run` in the caller's transaction (commit is the caller's)."""
    check_same_checkpoint(run, document)
    nodes: dict[tuple[int, int], SubtreeNode] = {}
    for node, expected_level in _walk(document.root):
        if node.level != expected_level:
            raise DocumentError(
                f"node {node.level}/{node.index} is nested at level {expected_level}: "
                "children are one level down"
            )
        key = (node.level, node.index)
        if key in nodes and _annotation(nodes[key]) != _annotation(node):
            raise DocumentError(f"feature {key[0]}/{key[1]} appears twice with different annotations")
        nodes[key] = node
    annotated = {key: node for key, node in nodes.items() if _has_annotation(node)}
    current = queries.lock_annotations(session, run.id, sorted(annotated))
    missing = sorted(set(annotated) - set(current))
    if missing:
        shown = ", ".join(f"{level}/{index}" for level, index in missing[:5])
        raise RunMismatchError(f"run {run.name!r} has no feature {shown} (of {len(missing)} in the document)")
    applied = 0
    for key, node in sorted(annotated.items()):
        label, note, tags = _annotation(node)
        change = queries.write_annotation(session, run, current[key], label, note, tags, author)
        applied += change.changed
    return ImportResult(
        run=run.name,
        features=len(nodes),
        applied=applied,
        unchanged=len(annotated) - applied,
        skipped=len(nodes) - len(annotated),
    )


def _walk(root: SubtreeNode) -> Iterator[tuple[SubtreeNode, int]]:
    stack = [(root, root.level)]
    while stack:
        node, level = stack.pop()
        yield node, level
        stack.extend((child, level + 1) for child in reversed(node.children))


def _annotation(node: SubtreeNode) -> tuple[str | None, str | None, list[str]]:
    return node.label, node.note, list(node.tags)


def _has_annotation(node: SubtreeNode) -> bool:
    return node.label is not None or node.note is not None or bool(node.tags)


def choose_run(session: Session, document: SubtreeDocument, run_name: str | None = None) -> Row:
    """The run a document applies to: `run_name` if given, else the run of the same checkpoint, preferring
    the document's own run name."""
    if run_name is not None:
        run = queries.get_run(session, run_name)
        if run is None:
            raise UnknownRunError(f"no run named {run_name!r}")
        return run
    source = document.run
    candidates = queries.find_runs_by_identity(
        session, source.model, source.layer, source.arch, source.checkpoint_digest
    )
    for run in candidates:
        if run.name == source.name:
            return run
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        names = ", ".join(run.name for run in candidates)
        raise RunMismatchError(f"several runs hold this checkpoint ({names}); name the one to import into")
    raise RunMismatchError(
        f"no run holds the document's checkpoint (model {source.model!r}, layer {source.layer}, arch "
        f"{source.arch!r}, digest {source.checkpoint_digest[:12]}...); index that checkpoint first"
    )


# ---- the command line's entry points (`hsae export`, `hsae import`) --------------------------------------
def export_subtree(
    run_name: str,
    level: int,
    index: int,
    *,
    depth: int | None = None,
    include_examples: bool = True,
    db_url: str | None = None,
) -> dict[str, Any]:
    """`hsae export RUN LEVEL INDEX [--depth N]`: the same document as GET .../export."""
    if depth is not None and depth < 0:
        raise HSAEError(f"depth must be >= 0, got {depth}")
    engine = open_database(db_url or get_settings().resolved_database_url)
    try:
        with session_factory(engine)() as session:
            run = queries.get_run(session, run_name)
            if run is None:
                raise UnknownRunError(f"no run named {run_name!r}")
            document = build_subtree(
                session, run, level, index, depth=depth, include_examples=include_examples
            )
            return document.model_dump(mode="json")
    finally:
        engine.dispose()


def write_document(document: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(document, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def read_document(path: str | Path) -> SubtreeDocument:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise DocumentError(f"cannot read {path}: {err.strerror or err}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DocumentError(f"{path} is not a JSON document: {err}") from None
    except RecursionError:
        raise DocumentError(f"{path} is nested too deeply") from None
    return parse_document(data)


def import_document(
    source: str | Path | dict[str, Any],
    *,
    db_url: str | None = None,
    run_name: str | None = None,
    author: str | None = None,
) -> ImportResult:
    """`hsae import FILE`: apply a document's annotations (a file, or parsed JSON) to its run, atomically."""
    if isinstance(source, dict):
        document, author = parse_document(source), author or "import"
    else:
        document, author = read_document(source), author or f"import:{Path(source).name}"[:200]
    engine = open_database(db_url or get_settings().resolved_database_url)
    try:
        with session_factory(engine)() as session, session.begin():
            run = choose_run(session, document, run_name)
            return apply_document(session, run, document, author)
    finally:
        engine.dispose()


if __name__ == "__main__":  # python -m backend.export: rewrite the committed JSON Schema from the models
    write_schema()
    print(f"wrote {SCHEMA_PATH}")
