"""Who may use the console, and the CSRF check on everything that changes something.

- A trusted listener (the Unix socket: its file mode is the access control, as for the API)
  needs no login: the first page gives the browser a session.
- On TCP the agent's bearer token is exchanged once, in the login form, for a session
  cookie; a request that carries the token itself (``stoker ui`` in front of a TCP agent)
  gets a session the same way.
- Every POST must send the session's CSRF token (the ``X-CSRF-Token`` header htmx adds, or
  the ``csrf`` field of a plain form).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import quote

from fastapi import Depends, Request
from fastapi.responses import RedirectResponse, Response

from stoker.web.sessions import COOKIE, LIFETIME_S, Session, Sessions, csrf_matches

CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf"


@dataclass
class Gate:
    """The console's side of one listener: its sessions and what logs in."""

    sessions: Sessions
    #: None: a trusted listener (no login); else the agent's bearer token
    token: str | None

    @property
    def trusted(self) -> bool:
        return self.token is None

    def token_matches(self, given: str) -> bool:
        return self.token is not None and secrets.compare_digest(
            given.encode(), self.token.encode()
        )

    def bearer_ok(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        return header.startswith("Bearer ") and self.token_matches(header[len("Bearer ") :])


class LoginRequired(Exception):
    """No session, no trusted listener, no token: the browser must log in first."""


class CSRFRefused(Exception):
    """A state-changing request without its session's CSRF token."""


def gate(request: Request) -> Gate:
    return request.app.state.gate  # type: ignore[no-any-return]


def session(request: Request) -> Session:
    """The request's session: its cookie's, or a new one where no login is needed."""
    g = gate(request)
    found = g.sessions.get(request.cookies.get(COOKIE))
    if found is not None:
        return found
    if g.trusted or g.bearer_ok(request):
        return g.sessions.create()
    raise LoginRequired


ConsoleSession = Annotated[Session, Depends(session)]


async def checked_session(request: Request, current: ConsoleSession) -> Session:
    """``session`` for a state-changing request: refused without the CSRF token."""
    given = request.headers.get(CSRF_HEADER)
    if given is None and request.headers.get("content-type", "").startswith(
        "application/x-www-form-urlencoded"
    ):
        field = (await request.form()).get(CSRF_FIELD)
        given = field if isinstance(field, str) else None
    if not csrf_matches(current, given):
        raise CSRFRefused
    return current


ChangingSession = Annotated[Session, Depends(checked_session)]


def set_cookie(response: Response, current: Session, request: Request) -> None:
    """Give the browser a new session's cookie (nothing for one it already has)."""
    if not current.fresh:
        return
    response.set_cookie(
        COOKIE,
        current.cookie,
        max_age=LIFETIME_S,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def login_redirect(request: Request) -> Response:
    """To the login form, coming back here after (htmx follows ``HX-Redirect``)."""
    root = request.scope.get("root_path", "")
    here = request.url.path
    if request.url.query:
        here += "?" + request.url.query
    target = f"{root}/login?next={quote(here, safe='')}"
    if request.headers.get("hx-request"):
        return Response(status_code=401, headers={"HX-Redirect": target})
    return RedirectResponse(target, status_code=303)


def safe_next(root: str, given: str | None) -> str:
    """Where to go after login: only a console page of this agent, never another site."""
    if given and given.startswith(root + "/") and not given.startswith("//") and "\\" not in given:
        return given
    return root + "/"
