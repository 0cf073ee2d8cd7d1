from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from backend import queries
from backend.api import views
from backend.api.deps import APIError, DbDep, LiveDep, RunName, find_run, not_found
from backend.api.schemas import ActivationsIn, ActivationsOut, SteerIn, SteerOut
from backend.live import LiveRunSpec, SteerTerm

router = APIRouter(tags=["live"])


@router.post(
    "/runs/{run}/activations",
    response_model=ActivationsOut,
    responses=views.errors(400, 409, 413, 503, 504),
)
async def activations(db: DbDep, live: LiveDep, run_name: RunName, body: ActivationsIn):
    """Encode a prompt with the run's language model and HSAE: its tokens (with character offsets), per
    token the active features of every level with their parent links, and the strongest top-level features
    with their active children."""

    def lookup_run():
        with db() as session:
            return find_run(session, run_name)

    run = await run_in_threadpool(lookup_run)
    spec = LiveRunSpec(run.name, run.model_name, run.layer, run.checkpoint_path, run.checkpoint_digest)
    result = await live.activations(spec, body.text)
    nodes, stack = [], list(result.summary)
    while stack:
        nodes.append(stack.pop())
        stack.extend(nodes[-1]["children"])

    def labels():
        with db() as session:
            return queries.labels_of(session, run.id, {(n["level"], n["index"]) for n in nodes})

    found = await run_in_threadpool(labels) if nodes else {}
    for node in nodes:
        node["label"] = found.get((node["level"], node["index"]))
    return {
        "run": run.name,
        "model": run.model_name,
        "layer": run.layer,
        "device": result.device,
        "tokens": result.tokens,
        "summary": result.summary,
        "elapsed_ms": result.elapsed_ms,
    }


@router.post(
    "/runs/{run}/steer",
    response_model=SteerOut,
    responses=views.errors(400, 409, 413, 503, 504),
)
async def steer(db: DbDep, live: LiveDep, run_name: RunName, body: SteerIn):
    """Greedy continuations of a prompt with and without steering: the feature's decoder direction, times
    `strength` × its max activation, added to the output of the hooked layer at every position (with
    `with_children`, also the mean of its children's directions, each times strength × its own max
    activation). Both come from one batch of the same model, so strength 0 gives the unsteered text twice."""
    level, index = body.feature.level, body.feature.index

    def lookup():
        with db() as session:
            run = find_run(session, run_name)
            return run, *queries.steering_features(session, run.id, level, index, body.with_children)

    run, feature, children = await run_in_threadpool(lookup)
    if feature is None:
        raise not_found(f"run {run.name!r} has no feature {index} at level {level}")
    if feature.max_act <= 0:
        raise APIError(
            422,
            "invalid_request",
            f"feature {index} at level {level} never fired on the indexed tokens: it has no activation "
            "scale to steer by",
        )
    terms = [SteerTerm(level, index, body.strength * feature.max_act)]
    used = [child for child in children if child.max_act > 0]
    terms += [SteerTerm(c.level, c.idx, body.strength * c.max_act / len(used)) for c in used]
    spec = LiveRunSpec(run.name, run.model_name, run.layer, run.checkpoint_path, run.checkpoint_digest)
    output, device, elapsed_ms = await live.steer(spec, body.text, terms, body.max_new_tokens)
    return {
        "run": run.name,
        "model": run.model_name,
        "layer": run.layer,
        "device": device,
        "feature": {"level": level, "index": index, "label": feature.label},
        "strength": body.strength,
        "max_act": feature.max_act,
        "children": len(used),
        "steered": {"text": output.steered.text, "token_ids": output.steered.token_ids},
        "unsteered": {"text": output.unsteered.text, "token_ids": output.unsteered.token_ids},
        "elapsed_ms": elapsed_ms,
    }
