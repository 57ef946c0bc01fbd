"""The web console at ``/ui``: server-rendered pages (Jinja2) made live with htmx and the
agent's server-sent event stream, charts drawn by uPlot.

It is mounted into each listener's API app and reads the agent's services directly, never
over HTTP. Its sign-in rules are in ``web.auth``; its third-party browser code in
``web.assets``.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from stoker.services.container import Services
from stoker.services.errors import ServiceError
from stoker.web import actions, pages
from stoker.web.assets import INSTALL_HINT, STATIC, Vendor
from stoker.web.auth import CSRFRefused, Gate, LoginRequired, login_redirect, session
from stoker.web.render import SECURITY_HEADERS, Renderer
from stoker.web.sessions import COOKIE, Sessions

PREFIX = "/ui"
#: the API path a console page may read with its session cookie alone (its live updates)
EVENT_STREAM = "/api/v1/events/stream"


def create_console(services: Services, token: str | None, vendor: Vendor | None = None) -> FastAPI:
    """The console for one listener: ``token`` None for a trusted one (the Unix socket)."""
    console = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    vendor = vendor or Vendor()
    console.state.services = services
    console.state.gate = Gate(Sessions(), token)
    console.state.render = Renderer(vendor)
    console.include_router(pages.router)
    console.include_router(actions.router)
    console.mount("/static", StaticFiles(directory=STATIC), name="static")

    @console.get("/vendor/{name}")
    async def vendored(name: str) -> Response:
        path = vendor.path(name)
        if path is None:
            return Response(INSTALL_HINT, status_code=404, media_type="text/plain")
        return FileResponse(path, headers={"Cache-Control": "max-age=3600"})

    @console.exception_handler(LoginRequired)
    async def needs_login(request: Request, _: LoginRequired) -> Response:
        return login_redirect(request)

    @console.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> Response:
        """A VM or snapshot that is not there (or an ambiguous id prefix): a page saying so."""
        try:
            current = session(request)
        except LoginRequired:
            return login_redirect(request)
        render: Renderer = console.state.render
        return render(
            request, current, "error.html", status=exc.status, title=exc.title, detail=exc.detail
        )

    @console.exception_handler(CSRFRefused)
    async def csrf_refused(_: Request, __: CSRFRefused) -> Response:
        return HTMLResponse(
            "This request lacks the page's CSRF token: reload the page and try again.",
            status_code=403,
            headers=SECURITY_HEADERS,
        )

    return console


def mount(app: FastAPI, services: Services, token: str | None = None) -> None:
    """Serve the console at ``/ui`` of ``app`` under the same trust as its API."""
    console = create_console(services, token)
    app.state.console_gate = console.state.gate

    @app.get(PREFIX, include_in_schema=False)
    async def console_root() -> Response:
        return RedirectResponse(PREFIX + "/", status_code=308)

    app.mount(PREFIX, console, name="console")


def admits(request: Request) -> bool:
    """For the API's token check: the console does its own sign-in, and a console session
    may read the event stream (a browser's EventSource cannot send a bearer token)."""
    path = request.url.path
    if path == PREFIX or path.startswith(PREFIX + "/"):
        return True
    if request.method != "GET" or path != EVENT_STREAM:
        return False
    gate: Gate | None = getattr(request.app.state, "console_gate", None)
    return gate is not None and gate.sessions.get(request.cookies.get(COOKIE)) is not None
