"""Assembling the FastAPI application from services and runtime state."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from fleetgate import __version__
from fleetgate.api import problems
from fleetgate.api.middleware import RequestContext
from fleetgate.api.routes_audit import router as audit_router
from fleetgate.api.routes_ca import router as ca_router
from fleetgate.api.routes_credentials import router as credentials_router
from fleetgate.api.routes_devices import router as devices_router
from fleetgate.api.routes_groups import router as groups_router
from fleetgate.api.routes_node import router as node_router
from fleetgate.api.routes_ops import router as ops_router
from fleetgate.api.routes_pki import router as pki_router
from fleetgate.api.routes_sessions import router as sessions_router
from fleetgate.api.routes_tokens import router as tokens_router
from fleetgate.api.schemas import Problem
from fleetgate.clock import Clock
from fleetgate.health import Health
from fleetgate.metrics import Metrics
from fleetgate.remote.records import BindFailure
from fleetgate.services.bundle import Services

_ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    code: {"model": Problem, "description": text, "content": {"application/problem+json": {}}}
    for code, text in (
        (400, "The body is not valid JSON"),
        (401, "Missing, unknown or expired token"),
        (403, "The token's role or groups do not allow this"),
        (404, "No such resource (or not visible to this token)"),
        (409, "Conflicts with existing state"),
        (412, "If-Match names a revision that is no longer current"),
        (413, "The body is larger than api.max_body_bytes"),
        (422, "A field is invalid; `errors` names each one"),
        (503, "The store is unavailable"),
    )
}


def build_app(
    services: Services,
    health: Health,
    metrics: Metrics,
    clock: Clock,
    *,
    max_body_bytes: int,
    after_write: Callable[[], Awaitable[object]] | None = None,
    reload: Callable[[], Coroutine[Any, Any, None]] | None = None,
    session_bind_failure: Callable[[str], Awaitable[BindFailure | None]] | None = None,
    data_dir: Path | None = None,
) -> FastAPI:
    app = FastAPI(
        title="fleetgate",
        version=__version__,
        summary="Secure connectivity gateway for IoT fleets",
        docs_url=None,
        redoc_url=None,
        responses=_ERROR_RESPONSES,
    )
    app.state.services = services
    app.state.health = health
    app.state.metrics = metrics
    app.state.data_dir = data_dir  # where workers leave their metrics (metrics_share)
    app.state.clock = clock
    app.state.reload = reload
    # After opening a session: why its public port could not be bound, if it could not.
    app.state.session_bind_failure = session_bind_failure
    problems.install(app)
    for router in (
        ops_router,
        pki_router,
        devices_router,
        groups_router,
        tokens_router,
        audit_router,
        ca_router,
        credentials_router,
        node_router,
        sessions_router,
    ):
        app.include_router(router)

    # Swagger UI from a Python package, so /docs works on a network with no way out.
    app.mount("/docs/static", StaticFiles(directory=swagger_ui_path), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="fleetgate API",
            swagger_js_url="/docs/static/swagger-ui-bundle.js",
            swagger_css_url="/docs/static/swagger-ui.css",
            swagger_favicon_url="/docs/static/favicon-32x32.png",
        )

    app.add_middleware(
        RequestContext, metrics=metrics, max_body_bytes=max_body_bytes, after_write=after_write
    )
    return app
