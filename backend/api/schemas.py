"""The wire contract: every request and response body of the JSON API, as pydantic models.

The OpenAPI document is generated from these models and a test compares it with a checked-in snapshot
(tests/backend/openapi.snapshot.json), so changing a field here is a visible, deliberate change of the API.
A feature is addressed by run name + level + index; level 0 is the top of the forest.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MAX_LIMIT = 500
MAX_OFFSET = 1_000_000_000
MAX_LEVEL = 64
MAX_INDEX = 2**31 - 1  # the database's INTEGER; beyond it PostgreSQL would fail instead of answering 404
LEVEL_BOUNDS = {"ge": 0, "le": MAX_LEVEL}
"""A feature's level, and a depth below it, as every path, query, body and command takes them."""
INDEX_BOUNDS = {"ge": 0, "le": MAX_INDEX}
"""A feature's index within its level, as every path, body and command takes it."""
MAX_LABEL_CHARS = 500
MAX_NOTE_CHARS = 20_000
MAX_TAGS = 50
MAX_TAG_CHARS = 100
MAX_QUERY_CHARS = 200


def _distinct(tags: list[str]) -> list[str]:
    return list(dict.fromkeys(tags))


def _utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; every time the database stores is UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


Text = Annotated[str, Field(pattern=r"^[^\x00]*$")]
"""Text from a client: no NUL, which PostgreSQL refuses in text (pydantic itself refuses lone surrogates,
which no database could store either)."""
UtcDatetime = Annotated[datetime, AfterValidator(_utc)]
Level = Annotated[int, Field(**LEVEL_BOUNDS, description="0 is the top level (roots)")]
Index = Annotated[int, Field(**INDEX_BOUNDS, description="the feature's latent index within its level")]


def is_feature_address(level: int, index: int) -> bool:
    """Whether (level, index) can name a feature at all: what the API refuses with 422 before any query, and
    what the command line's export checks before it asks the database (which could not even store it)."""
    return (
        LEVEL_BOUNDS["ge"] <= level <= LEVEL_BOUNDS["le"]
        and INDEX_BOUNDS["ge"] <= index <= INDEX_BOUNDS["le"]
    )


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- errors ----------------------------------------------------------------------------------------------
class FieldError(Model):
    loc: list[str | int] = Field(description="where: e.g. ['query', 'limit']")
    msg: str
    type: str


class ErrorBody(Model):
    """Every 4xx and 5xx answer."""

    error: str = Field(description="machine-readable kind, e.g. not_found, unauthorized, invalid_request")
    detail: str = Field(description="what went wrong, for a person")
    errors: list[FieldError] | None = Field(default=None, description="per-field problems of a 422")


# ---- runs ------------------------------------------------------------------------------------------------
class RunSummary(Model):
    name: str
    model: str = Field(description="language model name or path")
    layer: int
    hook: str
    arch: str
    checkpoint_digest: str
    level_widths: list[int]
    n_tokens: int = Field(description="tokens indexed")
    created_at: UtcDatetime
    live: bool = Field(description="whether live prompt activations can be computed (checkpoint path known)")


class LevelSource(Model):
    """Where a level of a run indexed from sae-lens SAEs (`hsae index-sae`) came from."""

    path: str = Field(description="the SAE's folder, as it was when indexed")
    architecture: str = Field(description="the architecture sae-lens loaded it as (topk, jumprelu, ...)")
    d_sae: int = Field(description="the SAE's width")
    width: int = Field(description="features in this level")
    features: list[int] = Field(description="[start, stop): the SAE's features this level holds")
    matryoshka_group: int | None = Field(description="the Matryoshka group, if the level is one")


class RunDetail(RunSummary):
    config: dict[str, Any] = Field(description="the checkpoint's cfg.json")
    sources: list[LevelSource] | None = Field(
        default=None, description="per level, the sae-lens SAE it came from; null for an HSAE checkpoint")
    metrics: dict[str, Any] | None
    corpus: dict[str, Any]
    index_settings: dict[str, Any]


class RunsPage(Model):
    total: int
    offset: int
    limit: int
    items: list[RunSummary]


# ---- features --------------------------------------------------------------------------------------------
class SortKey(StrEnum):
    """index: ascending; label: ascending, unlabelled last; density, max_act, child_count: descending.
    Ties are broken by index in the same direction."""

    index = "index"
    density = "density"
    max_act = "max_act"
    child_count = "child_count"
    label = "label"


class FeatureRef(Model):
    level: int
    index: int
    label: str | None


class TopToken(Model):
    token: str
    logit: float


class EdgeStats(Model):
    """How a child co-fires with its parent, and how aligned their decoder directions are."""

    coactive_count: int
    p_parent_given_child: float | None
    p_child_given_parent: float | None
    decoder_cosine: float | None


class FeatureSummary(Model):
    level: int
    index: int
    label: str | None
    auto_label: str | None = Field(
        description="automatic: the tokens it fires on most, from its top examples; shown until labelled"
    )
    tags: list[str]
    density: float
    max_act: float
    fire_count: int
    child_count: int
    parent: FeatureRef | None
    top_tokens: list[str] = Field(description="the first few output tokens the feature promotes")


class ChildSummary(FeatureSummary):
    edge: EdgeStats | None = Field(description="statistics of the link to the parent, if indexed")


class ForestPage(Model):
    run: str
    level: int
    sort: SortKey
    q: str | None
    total: int
    offset: int
    limit: int
    items: list[FeatureSummary]


class ChildrenPage(Model):
    parent: FeatureRef
    sort: SortKey
    total: int
    offset: int
    limit: int
    items: list[ChildSummary]


class FeaturePosition(Model):
    """Where a feature is listed in the order of `sort`, as the offset at which each listing returns it, so a
    client can fetch the page that holds it directly."""

    feature: FeatureRef
    sort: SortKey
    forest_offset: int = Field(description="in GET /runs/{run}/forest?level={level}&sort={sort} (no q)")
    children_offset: int | None = Field(
        description="in its parent's GET .../children?sort={sort}; null for a feature without a parent"
    )


class FeatureStats(Model):
    fire_count: int = Field(description="tokens on which the feature is active")
    density: float = Field(description="fraction of indexed tokens on which it is active")
    max_act: float
    mean_act: float = Field(description="mean over active tokens")


class Histogram(Model):
    """Counts of non-zero activations in bins [edges[i], edges[i+1])."""

    edges: list[float]
    counts: list[int]


class Relative(Model):
    """A feature of another level that this one co-fires with among the most (a cross-width relative)."""

    feature: FeatureRef
    rank: int = Field(description="0: the most co-firing of its level (by tokens where both fire)")
    coactive_count: int = Field(description="tokens on which both fire")
    p_relative_given_feature: float = Field(description="P(relative fires | this feature fires)")
    p_feature_given_relative: float = Field(description="P(this feature fires | relative fires)")
    decoder_cosine: float | None = Field(description="cosine of the two decoder directions, if known")


class FeatureDetail(Model):
    run: str
    level: int
    index: int
    label: str | None
    auto_label: str | None = Field(
        description="automatic: the tokens it fires on most, from its top examples; shown until labelled"
    )
    note: str | None
    tags: list[str]
    annotated_at: UtcDatetime | None
    stats: FeatureStats
    parent: FeatureRef | None
    parent_edge: EdgeStats | None
    child_count: int
    children: list[ChildSummary] = Field(description="the first children by index; all of them: .../children")
    top_positive: list[TopToken] = Field(description="output tokens the decoder direction promotes most")
    top_negative: list[TopToken] = Field(description="output tokens it suppresses most")
    histogram: Histogram
    relatives: list[Relative] = Field(
        description="the features of each other level it co-fires with most, by level then rank")


class ExampleKind(StrEnum):
    top = "top"
    quantile = "quantile"


class Example(Model):
    """A context with the feature's value on each token. kind 'top': rank 0.. by max value; 'quantile':
    bucket b of n holds contexts whose max lies in [b/n, (b+1)/n) × the feature's max activation."""

    kind: ExampleKind
    bucket: int
    rank: int
    context_id: int
    doc_id: str
    start: int = Field(description="position of the first token in the source document")
    tokens: list[str]
    values: list[float]
    max_value: float
    max_position: int


class ExamplesPage(Model):
    feature: FeatureRef
    kind: ExampleKind | None
    total: int
    offset: int
    limit: int
    items: list[Example]


# ---- annotations -----------------------------------------------------------------------------------------
Tag = Annotated[Text, Field(min_length=1, max_length=MAX_TAG_CHARS)]


class AnnotationIn(Model):
    """The whole annotation: what is sent replaces what was there (null / [] clear a field)."""

    label: Annotated[Text, Field(max_length=MAX_LABEL_CHARS)] | None = None
    note: Annotated[Text, Field(max_length=MAX_NOTE_CHARS)] | None = None
    tags: Annotated[list[Tag], AfterValidator(_distinct)] = Field(default_factory=list, max_length=MAX_TAGS)


class Annotation(Model):
    run: str
    level: int
    index: int
    label: str | None
    note: str | None
    tags: list[str]
    annotated_at: UtcDatetime | None
    changed: bool = Field(description="false when the request repeated the stored annotation")


class AnnotationEventOut(Model):
    id: int
    changed_at: UtcDatetime
    author: str
    old_label: str | None
    new_label: str | None
    old_note: str | None
    new_note: str | None
    old_tags: list[str]
    new_tags: list[str]


class HistoryPage(Model):
    feature: FeatureRef
    total: int
    offset: int
    limit: int
    items: list[AnnotationEventOut] = Field(description="newest first")


# ---- search ----------------------------------------------------------------------------------------------
class SearchField(StrEnum):
    label = "label"
    note = "note"
    top_tokens = "top_tokens"


class SearchHit(FeatureSummary):
    matched: list[SearchField]


class SearchPage(Model):
    run: str
    q: str
    level: int | None
    total: int
    offset: int
    limit: int
    items: list[SearchHit] = Field(
        description="label matches first, then note, then top tokens; by level, index"
    )


# ---- live prompt activations -----------------------------------------------------------------------------
class ActivationsIn(Model):
    text: Annotated[Text, Field(min_length=1, description="the prompt; longer than the token limit: 413")]


class LiveFeature(Model):
    index: int
    value: float
    parent: int | None = Field(description="its parent's index in the level above; null: none")
    parent_active: bool = Field(description="whether that parent is active on the same token")


class LiveToken(Model):
    position: int
    id: int
    text: str = Field(description="the prompt's characters [start, end)")
    start: int
    end: int
    levels: list[list[LiveFeature]] = Field(
        description="per level (0 = top), the active features, strongest first"
    )


class LiveNode(Model):
    level: int
    index: int
    label: str | None
    token_count: int = Field(description="prompt tokens on which it is active")
    max_value: float
    total_value: float
    children: list[LiveNode] = Field(description="its active children, strongest first")


class ActivationsOut(Model):
    run: str
    model: str
    layer: int
    device: str
    tokens: list[LiveToken]
    summary: list[LiveNode] = Field(description="the strongest top-level features with their active children")
    elapsed_ms: float


# ---- steering ---------------------------------------------------------------------------------------------
MAX_STEER_TOKENS = 64
MAX_STEER_STRENGTH = 100.0


class FeatureAddress(Model):
    level: Level
    index: Index


class SteerIn(Model):
    text: Annotated[Text, Field(min_length=1, description="the prompt; longer than the token limit: 413")]
    feature: FeatureAddress
    strength: float = Field(
        ge=-MAX_STEER_STRENGTH,
        le=MAX_STEER_STRENGTH,
        allow_inf_nan=False,
        description="multiple of the feature's max activation added along its decoder direction (0: none)",
    )
    max_new_tokens: int = Field(default=16, ge=1, le=MAX_STEER_TOKENS, description="tokens generated")
    with_children: bool = Field(
        default=False,
        description="also add the mean of the feature's children's directions, each scaled by its own max "
        "activation times the strength",
    )


class Continuation(Model):
    text: str
    token_ids: list[int]


class SteerOut(Model):
    run: str
    model: str
    layer: int
    device: str
    feature: FeatureRef
    strength: float
    max_act: float = Field(description="the feature's max activation over the indexed tokens")
    children: int = Field(description="children whose directions were added (0 without with_children)")
    steered: Continuation = Field(description="greedy continuation with the feature's direction added")
    unsteered: Continuation = Field(description="greedy continuation of the same prompt, unchanged")
    elapsed_ms: float


# ---- export / import (Contract 4) ------------------------------------------------------------------------
class SubtreeRun(BaseModel):
    """The run a document comes from; an import needs a run with the same model, layer, arch and digest."""

    model_config = ConfigDict(extra="allow")

    name: str
    model: str
    layer: int
    hook: str | None = None
    arch: str
    checkpoint_digest: str
    level_widths: list[int] | None = None
    n_tokens: int | None = None


class SubtreeStats(BaseModel):
    model_config = ConfigDict(extra="allow")

    fire_count: int
    density: float
    max_act: float
    mean_act: float
    child_count: int


class SubtreeTopTokens(BaseModel):
    positive: list[TopToken]
    negative: list[TopToken]


class SubtreeExample(BaseModel):
    model_config = ConfigDict(extra="allow")

    kind: ExampleKind
    bucket: int
    rank: int
    doc_id: str
    start: int
    tokens: list[str]
    values: list[float]
    max_value: float
    max_position: int


class SubtreeNode(BaseModel):
    model_config = ConfigDict(extra="allow")

    level: Level
    index: Index
    label: Annotated[Text, Field(max_length=MAX_LABEL_CHARS)] | None
    note: Annotated[Text, Field(max_length=MAX_NOTE_CHARS)] | None
    tags: list[Tag] = Field(max_length=MAX_TAGS)
    stats: SubtreeStats | None = None
    top_tokens: SubtreeTopTokens | None = None
    examples: list[SubtreeExample] = Field(default_factory=list)
    children: list[SubtreeNode] = Field(default_factory=list)


class SubtreeDocument(BaseModel):
    """Contract 4: a feature and its descendants with their annotations, stats, top tokens and examples.
    backend/schemas/hsae-subtree.schema.json describes the same document as a JSON Schema."""

    model_config = ConfigDict(extra="allow")

    format: Literal["hsae-subtree"]
    version: Literal[1]
    exported_at: UtcDatetime | None = None
    depth: int | None = Field(default=None, description="levels below the root included; null: all")
    includes_examples: bool = True
    run: SubtreeRun
    root: SubtreeNode


class ImportResult(Model):
    run: str
    features: int = Field(description="nodes in the document")
    applied: int = Field(description="features whose annotation changed (one history event each)")
    unchanged: int = Field(description="annotated nodes whose annotation was already the same")
    skipped: int = Field(description="nodes without any annotation (an import never erases one)")


# ---- health ----------------------------------------------------------------------------------------------
class Health(Model):
    status: Literal["ok"]
    database: Literal["ok"]
