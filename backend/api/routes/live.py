from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from backend import queries
from backend.api import views
from backend.api.deps import DbDep, LiveDep, RunName, find_run
from backend.api.schemas import ActivationsIn, ActivationsOut
from backend.live import LiveRunSpec

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
