"""One router per resource; `backend.app.create_app` includes them all under /api/v1."""

from backend.api.routes import annotations, features, health, live, runs, search, transfer

API_ROUTERS = (runs.router, features.router, annotations.router, search.router, transfer.router, live.router)
ROOT_ROUTERS = (health.router,)
