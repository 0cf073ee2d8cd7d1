"""The browser UI: four HTML pages (jinja2 shells that the static ES modules in frontend/ fill from the JSON
API), the static files, and plotly.js served from the installed plotly package (no CDN, no build step).
A page of a run (or feature) that does not exist answers 404 with a page that says so.

create_app includes `router` and calls `mount_frontend(app)`.
"""

from __future__ import annotations

from pathlib import Path

import jinja2
import plotly
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from backend import queries
from backend.api.deps import IndexPath as Index, LevelPath as Level, SessionDep

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
FRONTEND_DIR = Path(__file__).resolve().parents[1] / "frontend"
PLOTLY_JS = Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"
PLOTLY_URL = f"/vendor/plotly-{plotly.__version__}.min.js"  # versioned: cached for good

templates = Jinja2Templates(
    env=jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,  # every value a page shows is data: run names come from users
        undefined=jinja2.StrictUndefined,
    )
)

router = APIRouter(include_in_schema=False)



def _write_mode(request: Request) -> str:
    """How annotation writes work here (see backend.api.deps.require_writer): "local" (no token needed),
    "token" (a bearer token is configured), or "off"."""
    if request.app.state.local:
        return "local"
    return "token" if request.app.state.settings.write_token else "off"


def _render(request: Request, template: str, *, run: str | None = None, status_code: int = 200,
            **context: object) -> HTMLResponse:
    return templates.TemplateResponse(
        request, template, {"run": run, "writes": _write_mode(request), "plotly_url": PLOTLY_URL, **context},
        status_code=status_code,
    )


def _missing(request: Request, message: str, run: str | None = None) -> HTMLResponse:
    return _render(request, "missing.html", run=run, message=message, status_code=404)


@router.get("/", response_class=HTMLResponse)
def runs_page(request: Request) -> HTMLResponse:
    return _render(request, "runs.html")


@router.get("/runs/{run}", response_class=HTMLResponse)
def forest_page(request: Request, session: SessionDep, run: str) -> HTMLResponse:
    if queries.get_run(session, run) is None:
        return _missing(request, f"No run named “{run}”.")
    return _render(request, "forest.html", run=run)


@router.get("/runs/{run}/features/{level}/{index}", response_class=HTMLResponse)
def feature_page(request: Request, session: SessionDep, run: str, level: Level, index: Index) -> HTMLResponse:
    found = queries.get_run(session, run)
    if found is None:
        return _missing(request, f"No run named “{run}”.")
    widths = found.level_widths
    if level >= len(widths) or index >= widths[level]:
        levels = ", ".join(f"level {lv}: 0–{w - 1}" for lv, w in enumerate(widths))
        return _missing(request, f"Run “{run}” has no feature L{level} #{index} ({levels}).", run=run)
    return _render(request, "feature.html", run=run, level=level, index=index)


@router.get("/runs/{run}/prompt", response_class=HTMLResponse)
def prompt_page(request: Request, session: SessionDep, run: str) -> HTMLResponse:
    if queries.get_run(session, run) is None:
        return _missing(request, f"No run named “{run}”.")
    return _render(request, "prompt.html", run=run)


class RevalidatedStaticFiles(StaticFiles):
    """Static files the browser must revalidate (a cheap 304 by ETag) before each use: without it, browsers
    cache by Last-Modified heuristics and an upgraded server could run yesterday's modules."""

    async def get_response(self, path: str, scope):  # type: ignore[no-untyped-def]
        response = await super().get_response(path, scope)
        response.headers["Cache-Control"] = "no-cache"
        return response


def mount_frontend(app: FastAPI) -> None:
    """Serve the plotly package's bundled plotly.min.js at PLOTLY_URL, and frontend/ at /static unless the
    app mounts it already."""

    @app.get(PLOTLY_URL, include_in_schema=False)
    def plotly_js() -> FileResponse:
        return FileResponse(PLOTLY_JS, media_type="text/javascript",
                            headers={"Cache-Control": "public, max-age=31536000, immutable"})

    if not any(getattr(route, "name", None) == "static" for route in app.routes):
        app.mount("/static", RevalidatedStaticFiles(directory=FRONTEND_DIR), name="static")
