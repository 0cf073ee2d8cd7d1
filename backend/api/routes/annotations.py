from fastapi import APIRouter

from backend import queries
from backend.api import views
from backend.api.deps import (
    DbDep,
    IndexPath,
    LevelPath,
    PagingDep,
    RunName,
    WriteDbDep,
    WriterDep,
    find_run,
    not_found,
)
from backend.api.schemas import Annotation, AnnotationIn, HistoryPage

router = APIRouter(tags=["annotations"])

FEATURE = "/runs/{run}/features/{level}/{index}"


@router.put(FEATURE + "/annotation", response_model=Annotation, responses=views.errors(400, 401, 403, 413))
def put_annotation(
    author: WriterDep,
    db: WriteDbDep,
    run_name: RunName,
    level: LevelPath,
    index: IndexPath,
    body: AnnotationIn,
):
    """Replace the feature's label, note and tags; the change is kept in its annotation history."""
    with db() as session, session.begin():
        run = find_run(session, run_name)
        current = queries.lock_annotations(session, run.id, [(level, index)]).get((level, index))
        if current is None:
            raise not_found(f"run {run.name!r} has no feature {level}/{index}")
        change = queries.write_annotation(session, run, current, body.label, body.note, body.tags, author)
    return {
        "run": run.name,
        "level": level,
        "index": index,
        "label": change.label,
        "note": change.note,
        "tags": change.tags,
        "annotated_at": change.annotated_at,
        "changed": change.changed,
    }


@router.get(FEATURE + "/annotation/history", response_model=HistoryPage, responses=views.ERRORS)
def annotation_history(db: DbDep, run_name: RunName, level: LevelPath, index: IndexPath, page: PagingDep):
    """Every change of the feature's annotation, newest first (kept across re-indexing of the run)."""
    with db() as session:
        run = find_run(session, run_name)
        found = queries.get_feature_ref(session, run.id, level, index)
        if found is None:
            raise not_found(f"run {run.name!r} has no feature {level}/{index}")
        total, events = queries.annotation_history(session, run, level, index, page.offset, page.limit)
        items = [
            {
                "id": e.id,
                "changed_at": e.changed_at,
                "author": e.author,
                "old_label": e.old_label,
                "new_label": e.new_label,
                "old_note": e.old_note,
                "new_note": e.new_note,
                "old_tags": e.old_tags,
                "new_tags": e.new_tags,
            }
            for e in events
        ]
    return {
        "feature": views.feature_ref(level, index, found.label),
        "total": total,
        "offset": page.offset,
        "limit": page.limit,
        "items": items,
    }
