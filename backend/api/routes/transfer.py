from typing import Annotated

from fastapi import APIRouter, Query

from backend import export
from backend.api import views
from backend.api.deps import (
    APIError,
    DbDep,
    IndexPath,
    LevelPath,
    RunName,
    WriteDbDep,
    WriterDep,
    find_run,
    not_found,
)
from backend.api.schemas import LEVEL_BOUNDS, ImportResult, SubtreeDocument

router = APIRouter(tags=["export"])

Depth = Annotated[int | None, Query(**LEVEL_BOUNDS, description="levels below the feature; none: all")]


@router.get(
    "/runs/{run}/features/{level}/{index}/export", response_model=SubtreeDocument, responses=views.ERRORS
)
def export_subtree(
    db: DbDep,
    run_name: RunName,
    level: LevelPath,
    index: IndexPath,
    depth: Depth = None,
    examples: Annotated[bool, Query(description="include each feature's examples")] = True,
):
    """The feature's subtree as a portable document (Contract 4) that `hsae import` reads back."""
    with db() as session:
        run = find_run(session, run_name)
        try:
            return export.build_subtree(session, run, level, index, depth=depth, include_examples=examples)
        except export.UnknownFeatureError as err:
            raise not_found(str(err)) from None


@router.post(
    "/runs/{run}/import", response_model=ImportResult, responses=views.errors(400, 401, 403, 409, 413)
)
def import_document(author: WriterDep, db: WriteDbDep, run_name: RunName, document: SubtreeDocument):
    """Apply an exported document's annotations to this run, which must hold the same checkpoint (same
    model, layer, arch and digest). Nodes without annotations are skipped: an import never erases one."""
    with db() as session, session.begin():
        run = find_run(session, run_name)
        try:
            return export.apply_document(session, run, document, f"import:{author}")
        except export.DocumentError as err:
            raise APIError(422, "invalid_request", str(err)) from None
        except export.RunMismatchError as err:
            raise APIError(409, "conflict", str(err)) from None
