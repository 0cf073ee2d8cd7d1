"""Database rows to the wire shapes of backend/api/schemas (plain dicts: FastAPI validates and serializes
them against the response models in one pass of pydantic's core)."""

from __future__ import annotations

from typing import Any

from backend.api.schemas import ErrorBody
from backend.db.models import Run
from backend.queries import TOP_TOKENS_SHOWN

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        404: "unknown run or feature",
        422: "invalid parameters or body",
    }.items()
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the error statuses a route may answer, besides 404 and 422."""
    described = {
        400: "the body could not be parsed (not UTF-8, nested too deeply)",
        401: "missing or wrong write token",
        403: "writes are disabled on this server",
        409: "the request does not fit the run's state",
        413: "request body or prompt too large",
        503: "busy or unavailable; see Retry-After",
        504: "timed out",
    }
    return {**ERRORS, **{s: {"model": ErrorBody, "description": described[s]} for s in statuses}}


def run_summary(run: Any) -> dict[str, Any]:
    """From a Run or a row of queries.RUN_COLUMNS."""
    return {
        "name": run.name,
        "model": run.model_name,
        "layer": run.layer,
        "hook": run.hook,
        "arch": run.arch,
        "checkpoint_digest": run.checkpoint_digest,
        "level_widths": run.level_widths,
        "n_tokens": run.n_tokens,
        "created_at": run.created_at,
        "live": bool(run.checkpoint_path),
    }


def run_detail(run: Run) -> dict[str, Any]:
    return {
        **run_summary(run),
        "config": run.config,
        "sources": run.config.get("levels") if run.config.get("source") == "sae-lens" else None,
        "metrics": run.metrics,
        "corpus": run.corpus,
        "index_settings": run.index_settings,
    }


def feature_ref(level: int, index: int, label: str | None) -> dict[str, Any]:
    return {"level": level, "index": index, "label": label}


def parent_ref(row: Any) -> dict[str, Any] | None:
    if row.parent_level is None or row.parent_idx is None:
        return None
    return feature_ref(row.parent_level, row.parent_idx, row.parent_label)


def feature_summary(row: Any) -> dict[str, Any]:
    return {
        "level": row.level,
        "index": row.idx,
        "label": row.label,
        "auto_label": row.auto_label,
        "tags": row.tags or [],
        "density": row.density,
        "max_act": row.max_act,
        "fire_count": row.fire_count,
        "child_count": row.child_count,
        "parent": parent_ref(row),
        "top_tokens": [token for token, _ in row.top_positive[:TOP_TOKENS_SHOWN]],
    }


def relative(row: Any) -> dict[str, Any]:
    return {
        "feature": feature_ref(row.rel_level, row.rel_idx, row.label),
        "rank": row.rank,
        "coactive_count": row.coactive_count,
        "p_relative_given_feature": row.p_relative_given_feature,
        "p_feature_given_relative": row.p_feature_given_relative,
        "decoder_cosine": row.decoder_cosine,
    }


def edge_stats(row: Any) -> dict[str, Any] | None:
    if row is None or row.coactive_count is None:
        return None
    return {
        "coactive_count": row.coactive_count,
        "p_parent_given_child": row.p_parent_given_child,
        "p_child_given_parent": row.p_child_given_parent,
        "decoder_cosine": row.decoder_cosine,
    }


def child_summary(row: Any) -> dict[str, Any]:
    return {**feature_summary(row), "edge": edge_stats(row)}


def top_tokens(pairs: list[Any]) -> list[dict[str, Any]]:
    return [{"token": token, "logit": logit} for token, logit in pairs]


def example(row: Any) -> dict[str, Any]:
    return {
        "kind": row.kind,
        "bucket": row.bucket,
        "rank": row.rank,
        "context_id": row.context_id,
        "doc_id": row.doc_id,
        "start": row.start,
        "tokens": row.tokens,
        "values": row.token_values,
        "max_value": row.max_value,
        "max_position": row.max_position,
    }
