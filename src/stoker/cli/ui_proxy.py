"""``stoker ui``'s loopback proxy: a browser reaches an agent that listens only on its Unix
socket (or on TCP with a token the browser never sees) through 127.0.0.1.

The port is open to every local user and to every page the browser runs, so it admits
nobody by default. ``stoker ui`` prints a login URL holding a one-time secret (as Jupyter
does): the first request with it, within ``LOGIN_TTL_S``, swaps it for an ``HttpOnly``,
``SameSite=Strict`` cookie; the secret is then spent. Every other request needs that cookie
and a ``Host`` of this very address (a DNS-rebinding page names another host). What passes
is forwarded as it is, streamed (the console's live updates are a server-sent event
stream); the agent's console does the rest (its own session, CSRF checks).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

COOKIE = "stoker_ui_proxy"
LOGIN_PATH = "/ui-login/"
#: the printed login URL works once, and only this long
LOGIN_TTL_S = 120.0
#: headers that describe one hop, never forwarded
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}


@dataclass
class Admission:
    """The one-time login secret, then the cookie of the one browser that used it."""

    ttl_s: float = LOGIN_TTL_S
    clock: Callable[[], float] = time.monotonic
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    issued: float = 0.0
    cookie: str | None = None

    def __post_init__(self) -> None:
        self.issued = self.clock()

    def redeem(self, given: str) -> str | None:
        """The session cookie for a valid, unspent, fresh secret; None otherwise."""
        if self.cookie is not None or self.clock() - self.issued > self.ttl_s:
            return None
        if not secrets.compare_digest(given.encode(), self.secret.encode()):
            return None
        self.cookie = secrets.token_urlsafe(32)
        return self.cookie

    def admits(self, cookie: str | None) -> bool:
        return (
            self.cookie is not None
            and cookie is not None
            and secrets.compare_digest(cookie.encode(), self.cookie.encode())
        )


def _upstream_headers(request: Request, token: str | None) -> list[tuple[str, str]]:
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
    headers = [(k, _without_proxy_cookie(v) if k.lower() == "cookie" else v) for k, v in headers]
    if token is not None:
        headers = [(k, v) for k, v in headers if k.lower() != "authorization"]
        headers.append(("authorization", f"Bearer {token}"))
    return headers


def _without_proxy_cookie(header: str) -> str:
    parts = [p.strip() for p in header.split(";")]
    return "; ".join(p for p in parts if p and not p.startswith(COOKIE + "="))


def create_proxy(
    upstream: httpx.AsyncClient, admission: Admission, allowed_hosts: set[str], token: str | None
) -> Starlette:
    """The proxy app: ``upstream`` is a client for the agent (its socket or its URL)."""

    async def login(request: Request) -> Response:
        cookie = admission.redeem(request.path_params["secret"])
        if cookie is None:
            return PlainTextResponse(
                "This login link was already used or has expired: run `stoker ui` again "
                "for a new one.",
                status_code=403,
            )
        response = RedirectResponse("/ui/", status_code=303)
        response.set_cookie(COOKIE, cookie, httponly=True, samesite="strict", path="/")
        return response

    async def forward(request: Request) -> Response:
        if not admission.admits(request.cookies.get(COOKIE)):
            return PlainTextResponse(
                "Open the login link `stoker ui` printed (this port admits only the browser "
                "that used it).",
                status_code=401,
            )
        outgoing = upstream.build_request(
            request.method,
            request.url.path + (f"?{request.url.query}" if request.url.query else ""),
            headers=_upstream_headers(request, token),
            content=await request.body(),
        )
        try:
            answer = await upstream.send(outgoing, stream=True)
        except httpx.HTTPError as exc:
            return PlainTextResponse(f"the stoker agent did not answer: {exc}", status_code=502)
        headers = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP}
        # several Set-Cookie headers must stay several
        response = StreamingResponse(
            answer.aiter_raw(),
            status_code=answer.status_code,
            background=BackgroundTask(answer.aclose),
        )
        for key, value in headers.items():
            if key.lower() != "set-cookie":
                response.headers[key] = value
        for value in answer.headers.get_list("set-cookie"):
            response.headers.append("set-cookie", value)
        return response

    async def guarded(request: Request) -> Response:
        if request.headers.get("host", "") not in allowed_hosts:
            return PlainTextResponse("wrong Host header", status_code=403)
        if request.url.path.startswith(LOGIN_PATH) and request.method == "GET":
            request.path_params["secret"] = request.url.path[len(LOGIN_PATH) :]
            return await login(request)
        return await forward(request)

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", guarded, methods=methods)])
