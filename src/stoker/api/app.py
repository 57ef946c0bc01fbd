"""Builds the FastAPI application around a running set of services."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from stoker import __version__, web
from stoker.api import (
    events,
    manifests,
    networks,
    openapi,
    problems,
    quotas,
    resources,
    schedules,
    snapshots,
    vms,
)
from stoker.api.problems import PROBLEM
from stoker.services.container import Services
from stoker.wire import VersionOut


def create_app(services: Services, token: str | None = None) -> FastAPI:
    """One app per listener: the Unix socket needs no token, TCP requires ``token``."""
    app = _api(cluster=services.cluster is not None)
    app.state.services = services
    web.mount(app, services, token)  # the console at /ui, under this listener's trust

    if token is not None:

        @app.middleware("http")
        async def require_token(
            request: Request, call_next: Callable[[Request], Awaitable[Response]]
        ) -> Response:
            given = request.headers.get("authorization", "")
            bearer_ok = secrets.compare_digest(given.encode(), f"Bearer {token}".encode())
            if not bearer_ok and not web.admits(request):  # the console signs in itself
                return JSONResponse(
                    {
                        "type": "about:blank",
                        "title": "Unauthorized",
                        "status": 401,
                        "detail": "this listener needs 'Authorization: Bearer <token>' "
                        "with the agent's API token",
                    },
                    status_code=401,
                    media_type=PROBLEM,
                    headers={"WWW-Authenticate": "Bearer"},
                )
            return await call_next(request)

    return app


def document(cluster: bool = False) -> dict[str, Any]:
    """The OpenAPI document the agent serves (in cluster mode with ``cluster``), built
    without services: for the checks that walk every operation."""
    return _api(cluster).openapi()


def _api(cluster: bool) -> FastAPI:
    """Every API route, its problem handlers and its OpenAPI document."""
    app = FastAPI(
        title="stoker",
        version=__version__,
        description="Node agent that keeps microVMs alive.",
    )
    problems.install(app)
    openapi.install(app)  # links from creates, the constraints the API enforces
    # fixed paths such as /api/v1/vms/metrics go before /api/v1/vms/{ref}
    routers = (events, resources, quotas, snapshots, schedules, networks, manifests, vms)
    for router in (module.router for module in routers):
        app.include_router(router)
    if cluster:  # cluster mode only (imports gRPC)
        from stoker.api import cluster as cluster_routes

        app.include_router(cluster_routes.router)

    @app.get("/api/v1/version", tags=["agent"])
    async def version() -> VersionOut:
        return VersionOut(version=__version__)

    return app
