"""Write an index result into the database so that readers only ever see whole runs.

Protocol: the run row is inserted with complete=False; contexts, features, edges and examples follow in
batches, each its own short transaction (so annotation writes on other runs interleave); one final transaction
makes the run complete (for a replacement: hides the old run and shows the new one, so readers see one or the
other); the old run is then deleted. On any exception, Ctrl-C included, the new run is deleted before the
exception propagates; if the process dies instead, the invisible orphan is deleted by the next index of that
name. Two processes must not index the same name at the same time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from itertools import repeat
from typing import Any

import numpy as np
from sqlalchemy import JSON, URL, Connection, Engine, Table, delete, insert, select, update
from sqlalchemy.orm import aliased

from backend.db.models import (
    EXAMPLE_KINDS,
    Context,
    Example,
    Feature,
    FeatureEdge,
    FeatureRelative,
    Run,
    hidden_runs,
    utcnow,
    visible_runs,
)
from backend.db.session import check_schema, compact_json, make_engine
from backend.index.labels import auto_label
from trainer.errors import HSAEError
from trainer.index.accumulate import KIND_QUANTILE, KIND_TOP, IndexResult, LevelIndex
from trainer.index.contexts import ContextProvider
from trainer.index.directions import OutputTokens
from trainer.index.run import RunInfo

log = logging.getLogger(__name__)

KIND_NAMES = dict(zip((KIND_TOP, KIND_QUANTILE), EXAMPLE_KINDS, strict=True))
Progress = Callable[[str, int, int], None]  # (stage, rows done, rows in stage)


class RunExistsError(HSAEError):
    """A complete run already holds the name and replacing it was not asked for."""


def round_significant(x: np.ndarray, digits: int) -> np.ndarray:
    """Round to `digits` significant digits so that each float prints short in JSON (0.1234, not 0.123400002).

    Dividing an integer by an exact power of ten gives the double nearest the decimal, whose repr is that
    decimal; for large numbers the power of ten multiplies instead."""
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    nz = np.isfinite(x) & (x != 0)
    v = x[nz]
    decimals = digits - 1 - np.floor(np.log10(np.abs(v))).astype(np.int64)
    decimals = np.clip(decimals, -22, 22)  # powers of ten up to 1e22 are exact doubles
    scale = 10.0 ** np.abs(decimals)
    small = decimals >= 0
    out_nz = np.empty_like(v)
    out_nz[small] = np.round(v[small] * scale[small]) / scale[small]
    out_nz[~small] = np.round(v[~small] / scale[~small]) * scale[~small]
    out[nz] = out_nz
    out[~np.isfinite(x)] = x[~np.isfinite(x)]
    return out


def _batches(total: int, size: int) -> Iterator[slice]:
    for start in range(0, total, size):
        yield slice(start, min(start + size, total))


def _nullable(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def delete_run(engine: Engine, run_id: int, features_per_batch: int = 5000) -> None:
    """Delete an incomplete (invisible) run: its rows in short transactions, so that annotation writes on
    SQLite are never locked out for long, and the run row last, so that an interrupted delete stays an
    orphan that the next index of the name finishes."""
    with engine.connect() as conn:
        run = conn.execute(hidden_runs(Run.level_widths).where(Run.id == run_id)).first()
        visible = (
            run is None and conn.execute(visible_runs(Run.id).where(Run.id == run_id)).first() is not None
        )
    if visible:
        raise ValueError(f"run {run_id} is visible; hide it (complete=False) before deleting it")
    if run is None:
        return
    for level, width in enumerate(run.level_widths):
        for start in range(0, width, features_per_batch):
            stop = start + features_per_batch
            with engine.begin() as conn:
                for table, level_col, idx_col in (
                    (Example, Example.level, Example.idx),
                    (FeatureEdge, FeatureEdge.child_level, FeatureEdge.child_idx),
                    (FeatureRelative, FeatureRelative.level, FeatureRelative.idx),
                    (Feature, Feature.level, Feature.idx),
                ):
                    conn.execute(delete(table).where(
                        table.run_id == run_id, level_col == level, idx_col >= start, idx_col < stop))
    with engine.begin() as conn:
        # whatever the widths did not cover
        for table in (Example, FeatureEdge, FeatureRelative, Feature, Context):
            conn.execute(delete(table).where(table.run_id == run_id))
        conn.execute(delete(Run).where(Run.id == run_id))


def write_run(
    db: Engine | str | URL,
    result: IndexResult,
    info: RunInfo,
    contexts: ContextProvider,
    *,
    output_tokens: Sequence[OutputTokens | None] | None = None,
    edge_cosines: np.ndarray | None = None,
    relative_cosines: np.ndarray | None = None,
    replace: bool = False,
    batch_rows: int = 10_000,
    progress: Progress | None = None,
) -> int:
    """Write `result` as run `info.name` and return its id.

    output_tokens: per level (or None) the top output tokens of each feature. edge_cosines: decoder cosine per
    edge, aligned with `result.edges()`; relative_cosines: the same per row of `result.relatives()`.
    replace: swap out an existing complete run of that name atomically;
    labels, notes and tags carry over to the new run when the checkpoint digest is the same.
    """
    if output_tokens is not None and (
        len(output_tokens) != len(result.level_widths)
        or any(t is not None and len(t.positive_ids) != w for t, w in zip(output_tokens, result.level_widths))
    ):
        raise ValueError("output_tokens needs one entry per level (or None), with a row per feature")
    engine = make_engine(db) if isinstance(db, str | URL) else db
    try:
        check_schema(engine)
        _prepare_name(engine, info.name, replace)
        run_id = _insert_run(engine, result, info)
        try:
            writer = _Writer(engine, run_id, result, batch_rows, progress)
            lengths = writer.contexts(contexts)  # first: the features' automatic labels come from them
            writer.features(output_tokens)
            writer.edges(edge_cosines)
            writer.relatives(relative_cosines)
            writer.examples(lengths)
            old_run = _publish(engine, run_id, info, replace)
        except BaseException:
            _discard(engine, run_id)
            raise
        if old_run is not None:
            try:
                delete_run(engine, old_run)
            except Exception:  # the new run is live; the hidden old one is an orphan the next index deletes
                log.warning("could not delete replaced run %d", old_run, exc_info=True)
        return run_id
    finally:
        if engine is not db:
            engine.dispose()


def _prepare_name(engine: Engine, name: str, replace: bool) -> None:
    """Refuse a taken name unless replacing; delete orphans that crashed writes of this name left behind."""
    with engine.begin() as conn:
        taken = visible_runs(Run.created_at).where(Run.name == name)
        existing = conn.execute(taken).first()
        if existing is not None and not replace:
            raise RunExistsError(
                f"run {name!r} already exists (indexed {existing.created_at:%Y-%m-%d %H:%M}); "
                "choose another --name, or pass --replace to re-index it"
            )
        orphans = conn.scalars(hidden_runs(Run.id).where(Run.name == name)).all()
    for orphan in orphans:
        log.info("deleting run %d, an unfinished earlier index of %r", orphan, name)
        delete_run(engine, orphan)


def _insert_run(engine: Engine, result: IndexResult, info: RunInfo) -> int:
    with engine.begin() as conn:
        return conn.execute(
            insert(Run)
            .values(
                name=info.name,
                model_name=info.model_name,
                layer=info.layer,
                hook=info.hook,
                arch=info.arch,
                checkpoint_digest=info.checkpoint_digest,
                checkpoint_path=info.checkpoint_path,
                config=info.config,
                metrics=info.metrics,
                corpus=info.corpus,
                index_settings=result.config.to_dict(),
                level_widths=list(result.level_widths),
                n_tokens=result.n_tokens,
                created_at=utcnow(),
                complete=False,
            )
            .returning(Run.id)
        ).scalar_one()


def _publish(engine: Engine, run_id: int, info: RunInfo, replace: bool) -> int | None:
    """Make the run visible, hiding the one it replaces in the same transaction; return the replaced id."""
    with engine.begin() as conn:
        old = conn.execute(
            visible_runs(Run.id, Run.checkpoint_digest).where(Run.name == info.name).with_for_update()
        ).first()
        if old is not None and not replace:
            raise RunExistsError(f"run {info.name!r} was created by another process while this one indexed")
        if old is not None:
            if old.checkpoint_digest == info.checkpoint_digest:
                _carry_annotations(conn, old.id, run_id)
            conn.execute(update(Run).where(Run.id == old.id).values(complete=False))
        conn.execute(update(Run).where(Run.id == run_id).values(complete=True))
    return None if old is None else old.id


def _carry_annotations(conn: Connection, old_run: int, new_run: int) -> None:
    """Copy label, note and tags of the old run's annotated features onto the same features of the new one."""
    old = aliased(Feature)
    same = (old.run_id == old_run) & (old.level == Feature.level) & (old.idx == Feature.idx)
    conn.execute(
        update(Feature)
        .where(Feature.run_id == new_run, select(old.idx).where(same, old.annotated_at.is_not(None)).exists())
        .values(
            label=select(old.label).where(same).scalar_subquery(),
            note=select(old.note).where(same).scalar_subquery(),
            tags=select(old.tags).where(same).scalar_subquery(),
            annotated_at=select(old.annotated_at).where(same).scalar_subquery(),
        )
    )


def _discard(engine: Engine, run_id: int) -> None:
    """Best-effort removal of a run that never became complete; a failure leaves an invisible orphan."""
    try:
        with engine.connect() as conn:
            hidden = conn.scalar(hidden_runs(Run.id).where(Run.id == run_id)) is not None
        if hidden:
            delete_run(engine, run_id)
    except Exception:
        log.warning("could not delete unfinished run %d; the next index of its name will", run_id,
                    exc_info=True)


class _Writer:
    """Bulk inserts of one run's rows, a transaction per batch."""

    def __init__(self, engine: Engine, run_id: int, result: IndexResult, batch_rows: int,
                 progress: Progress | None):
        self.engine, self.run_id, self.result = engine, run_id, result
        self.batch_rows, self.progress = batch_rows, progress
        # The token at the strongest position of every top example, read as the contexts are written.
        self.wanted: dict[int, set[int]] = {}
        for lv in result.levels:
            top = lv.examples.kind == KIND_TOP
            for context, position in zip(
                lv.examples.context[top].tolist(), lv.examples.max_position[top].tolist(), strict=True
            ):
                self.wanted.setdefault(context, set()).add(position)
        self.activating: dict[tuple[int, int], str] = {}

    def auto_labels(self, lv: LevelIndex) -> dict[int, str | None]:
        """Per feature of the level that has top examples, its automatic label (backend/index/labels.py)."""
        ex = lv.examples
        top = ex.kind == KIND_TOP  # rows sorted by (feature, kind, bucket, rank): strongest first
        tokens: dict[int, list[str]] = {}
        for feature, context, position in zip(
            ex.feature[top].tolist(), ex.context[top].tolist(), ex.max_position[top].tolist(), strict=True
        ):
            token = self.activating.get((context, position))
            if token is not None:
                tokens.setdefault(feature, []).append(token)
        return {feature: auto_label(found) for feature, found in tokens.items()}

    def _insert(self, stage: str, model: Any, rows: list[dict[str, Any]], done: int, total: int) -> None:
        columns = list(rows[0]) if rows else []
        table: Table = model.__table__
        for name in columns:  # JSON as text once, here or by the caller (RawJson), for either backend
            if isinstance(table.c[name].type, JSON):
                for row in rows:
                    value = row[name]
                    if value is not None and not isinstance(value, RawJson):
                        row[name] = compact_json(value)
        self._insert_tuples(stage, table, columns, [tuple(row.values()) for row in rows], done, total)

    def _insert_tuples(self, stage: str, table: Table, columns: list[str], values: list[tuple], done: int,
                       total: int) -> None:
        """Rows as tuples in the order of `columns`, their JSON values already text."""
        if values:
            with self.engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    _copy_rows(conn, table, columns, values)
                else:
                    _executemany(conn, table, columns, values)
        if self.progress is not None:
            self.progress(stage, done, total)

    def features(self, output_tokens: Sequence[OutputTokens | None] | None) -> None:
        result = self.result
        edges = result.config.hist_edges()
        total, done = sum(result.level_widths), 0
        for lv in result.levels:
            tokens = output_tokens[lv.level] if output_tokens is not None else None
            density, mean_act = result.density(lv.level), lv.mean_act()
            child_count = result.child_count(lv.level)
            labels = self.auto_labels(lv)
            for rows in _batches(lv.width, self.batch_rows):
                batch = [
                    self._feature_row(lv.level, int(i), lv, density, mean_act, child_count, edges, tokens)
                    | {"auto_label": labels.get(i)}
                    for i in range(rows.start, rows.stop)
                ]
                done += len(batch)
                self._insert("features", Feature, batch, done, total)

    def _feature_row(self, level: int, i: int, lv: LevelIndex, density: np.ndarray, mean_act: np.ndarray,
                     child_count: np.ndarray, edges: np.ndarray,
                     tokens: OutputTokens | None) -> dict[str, Any]:
        parent = int(lv.parent[i])
        positive = _token_pairs(tokens.positive(i)) if tokens is not None else []
        negative = _token_pairs(tokens.negative(i)) if tokens is not None else []
        return {
            "run_id": self.run_id,
            "level": level,
            "idx": i,
            "parent_level": level - 1 if parent >= 0 else None,
            "parent_idx": parent if parent >= 0 else None,
            "child_count": int(child_count[i]),
            "fire_count": int(lv.fire_count[i]),
            "density": float(density[i]),
            "max_act": float(lv.act_max[i]),
            "mean_act": float(mean_act[i]),
            "top_positive": positive,
            "top_negative": negative,
            # PostgreSQL text cannot hold NUL (JSON columns escape it).
            "top_tokens_text": "\n".join(token.replace("\x00", "") for token, _ in positive),
            "histogram": _histogram(lv.hist[i], edges),
            "label": None,
            "note": None,
            "tags": [],
        }

    def edges(self, cosines: np.ndarray | None) -> None:
        e = self.result.edges()
        if cosines is not None and len(cosines) != len(e):
            raise ValueError(f"{len(cosines)} edge cosines for {len(e)} edges")
        for rows in _batches(len(e), self.batch_rows):
            batch = [
                {
                    "run_id": self.run_id,
                    "parent_level": int(e.parent_level[j]),
                    "parent_idx": int(e.parent_idx[j]),
                    "child_level": int(e.child_level[j]),
                    "child_idx": int(e.child_idx[j]),
                    "coactive_count": int(e.coactive[j]),
                    "p_parent_given_child": _nullable(e.p_parent_given_child[j]),
                    "p_child_given_parent": _nullable(e.p_child_given_parent[j]),
                    "decoder_cosine": None if cosines is None else _nullable(cosines[j]),
                }
                for j in range(rows.start, rows.stop)
            ]
            self._insert("edges", FeatureEdge, batch, rows.stop, len(e))

    def relatives(self, cosines: np.ndarray | None) -> None:
        r = self.result.relatives()
        if cosines is not None and len(cosines) != len(r):
            raise ValueError(f"{len(cosines)} relative cosines for {len(r)} relatives")
        p_rel = round_significant(r.p_relative_given_feature, 6)
        p_feat = round_significant(r.p_feature_given_relative, 6)
        for rows in _batches(len(r), self.batch_rows):
            batch = [
                {
                    "run_id": self.run_id,
                    "level": int(r.level[j]),
                    "idx": int(r.idx[j]),
                    "rel_level": int(r.rel_level[j]),
                    "rel_idx": int(r.rel_idx[j]),
                    "rank": int(r.rank[j]),
                    "coactive_count": int(r.coactive[j]),
                    "p_relative_given_feature": float(p_rel[j]),
                    "p_feature_given_relative": float(p_feat[j]),
                    "decoder_cosine": None if cosines is None else _nullable(cosines[j]),
                }
                for j in range(rows.start, rows.stop)
            ]
            self._insert("relatives", FeatureRelative, batch, rows.stop, len(r))

    def contexts(self, provider: ContextProvider) -> dict[int, int]:
        """Insert the contexts examples show; return each one's length in tokens."""
        ids = self.result.context_ids()
        lengths: dict[int, int] = {}
        for rows in _batches(len(ids), self.batch_rows):
            wanted = ids[rows].tolist()
            records = provider.get_contexts(wanted)
            batch = []
            for context_id, record in zip(wanted, records, strict=True):
                lengths[context_id] = len(record.tokens)
                for position in self.wanted.get(context_id, ()):
                    if position < len(record.tokens):
                        self.activating[(context_id, position)] = record.tokens[position]
                batch.append({"run_id": self.run_id, "context_id": context_id, "tokens": list(record.tokens),
                              "doc_id": record.doc_id, "start": record.start})
            self._insert("contexts", Context, batch, rows.stop, len(ids))
        return lengths

    def examples(self, lengths: dict[int, int]) -> None:
        total, done = sum(len(lv.examples) for lv in self.result.levels), 0
        longest = max(lengths.values(), default=0)
        for lv in self.result.levels:
            for rows in _batches(len(lv.examples), self.batch_rows):
                ex = lv.examples.take(rows)
                values = round_significant(lv.token_values(rows, longest), 5)
                token_values = json_float_rows(values, [lengths[c] for c in ex.context.tolist()])
                kinds = [KIND_NAMES[k] for k in ex.kind.tolist()]
                batch = list(zip(
                    repeat(self.run_id), repeat(lv.level), ex.feature.tolist(), kinds, ex.bucket.tolist(),
                    ex.rank.tolist(), ex.context.tolist(), token_values, ex.max_value.astype(float).tolist(),
                    ex.max_position.tolist(),
                ))
                done += len(batch)
                self._insert_tuples("examples", Example.__table__, EXAMPLE_COLUMNS, batch, done, total)


EXAMPLE_COLUMNS = ["run_id", "level", "idx", "kind", "bucket", "rank", "context_id", "token_values",
                   "max_value", "max_position"]


class RawJson(str):
    """Text that is already a JSON document (compact_json's form), written as it is."""


def json_float_rows(values: np.ndarray, lengths: Sequence[int]) -> list[RawJson]:
    """Row j's first lengths[j] values as a JSON array, exactly as compact_json writes a list of those
    floats (a float's repr), but with the zeros written without formatting: most tokens of an example's
    context do not fire its feature, and json.dumps of every value was most of a SQLite index write."""
    values = np.asarray(values, np.float64)
    if len(values) == 0:
        return []
    longest = max(lengths)
    live = np.arange(values.shape[1]) < np.asarray(lengths)[:, None]
    rows, cols = np.nonzero((values != 0) & live)
    bounds = np.searchsorted(rows, np.arange(len(values) + 1)).tolist()
    texts = list(map(float.__repr__, values[rows, cols].tolist()))
    cols_list = cols.tolist()
    zeros = ["0.0"] * longest
    out = []
    for j, length in enumerate(lengths):
        parts = zeros[:length]
        for k in range(bounds[j], bounds[j + 1]):
            parts[cols_list[k]] = texts[k]
        out.append(RawJson("[" + ",".join(parts) + "]"))
    return out


def _executemany(conn: Connection, table: Table, columns: list[str], values: list[tuple]) -> None:
    """One executemany of plain tuples through the driver (sqlite3, qmark style): SQLAlchemy's per-row
    parameter processing cost more than the database's own work."""
    quote = conn.dialect.identifier_preparer.quote
    marks = ", ".join("?" * len(columns))
    conn.exec_driver_sql(
        f"INSERT INTO {quote(table.name)} ({', '.join(quote(c) for c in columns)}) VALUES ({marks})", values
    )


def _copy_rows(conn: Connection, table: Table, columns: list[str], values: list[tuple]) -> None:
    """PostgreSQL's COPY: about ten times the rows per second of an executemany of INSERTs."""
    quote = conn.dialect.identifier_preparer.quote
    sql = f"COPY {quote(table.name)} ({', '.join(quote(c) for c in columns)}) FROM STDIN"
    with conn.connection.driver_connection.cursor() as cursor, cursor.copy(sql) as copy:
        for row in values:
            copy.write_row(row)


def _token_pairs(pairs: list[tuple[str, float]]) -> list[list[Any]]:
    values = round_significant(np.array([v for _, v in pairs]), 5)
    return [[token, float(v)] for (token, _), v in zip(pairs, values, strict=True)]


def _histogram(counts: np.ndarray, edges: np.ndarray) -> dict[str, list[Any]]:
    """The non-empty stretch of a feature's histogram: bins from the first to the last non-zero count."""
    nonzero = np.flatnonzero(counts)
    if nonzero.size == 0:
        return {"edges": [], "counts": []}
    first, last = int(nonzero[0]), int(nonzero[-1])
    return {
        "edges": round_significant(edges[first : last + 2], 6).tolist(),
        "counts": counts[first : last + 1].tolist(),
    }
