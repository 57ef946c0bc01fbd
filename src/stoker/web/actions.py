"""What the console changes (all POST, all CSRF-checked): VM actions, snapshots, login."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from stoker.domain.capabilities import Unsupported
from stoker.domain.states import IllegalAction
from stoker.services.container import Services
from stoker.services.errors import ServiceError
from stoker.web.auth import ChangingSession, gate, safe_next, set_cookie
from stoker.web.pages import header_fragment, live_fragment, renderer_of, services_of
from stoker.web.render import SECURITY_HEADERS
from stoker.web.sessions import ANONYMOUS, COOKIE

router = APIRouter()

#: a failed login answers this late, so guessing tokens over one connection is slow
FAILED_LOGIN_DELAY_S = 1.0

VM_ACTIONS: dict[str, Callable[[Services, str], Awaitable[Any]]] = {
    "start": lambda svc, ref: svc.lifecycle.start(ref),
    "stop": lambda svc, ref: svc.lifecycle.stop(ref, graceful=True),
    "restart": lambda svc, ref: svc.lifecycle.restart(ref, graceful=True),
}

SNAPSHOT_ACTIONS: dict[str, Callable[[Services, str], Awaitable[Any]]] = {
    "verify": lambda svc, sid: svc.snapshots.verify(sid),
    "restore": lambda svc, sid: svc.snapshots.restore(sid),
    "protect": lambda svc, sid: _sync(svc.snapshots.set_protected, sid, True),
    "unprotect": lambda svc, sid: _sync(svc.snapshots.set_protected, sid, False),
}


async def _sync(call: Callable[..., Any], *args: Any) -> Any:
    return call(*args)


async def _attempt(work: Awaitable[Any]) -> str | None:
    """Run an action; None when it worked, else the message saying why it did not."""
    try:
        await work
    except (ServiceError, IllegalAction, Unsupported) as exc:
        return str(exc)
    return None


def _back(request: Request, path: str) -> Response | None:
    """A plain form post (no htmx) goes back to the page it came from."""
    if request.headers.get("hx-request"):
        return None
    root = request.scope.get("root_path", "")
    return RedirectResponse(f"{root}{path}", status_code=303, headers=SECURITY_HEADERS)


@router.post("/vms/{ref}/{action}", response_class=HTMLResponse)
async def vm_action(request: Request, session: ChangingSession, ref: str, action: str) -> Response:
    svc = services_of(request)
    vm = svc.directory.get(ref, 0)
    if action == "snapshot":
        error = await _attempt(svc.snapshots.create(vm.id))
        return _back(request, f"/vms/{vm.id}") or await live_fragment(
            request, session, vm.id, error
        )
    run = VM_ACTIONS.get(action)
    if run is None:
        return Response(status_code=404, headers=SECURITY_HEADERS)
    error = await _attempt(run(svc, vm.id))
    return _back(request, f"/vms/{vm.id}") or header_fragment(request, session, vm.id, error)


@router.post("/snapshots/{snapshot_id}/{action}", response_class=HTMLResponse)
async def snapshot_action(
    request: Request, session: ChangingSession, snapshot_id: str, action: str
) -> Response:
    svc = services_of(request)
    snap = svc.snapshots.get(snapshot_id)
    run = SNAPSHOT_ACTIONS.get(action)
    if run is None:
        return Response(status_code=404, headers=SECURITY_HEADERS)
    error = await _attempt(run(svc, snap.id))
    return _back(request, f"/vms/{snap.vm_id}") or await live_fragment(
        request, session, snap.vm_id, error
    )


# ---------------------------------------------------------------------------- login


@router.get("/login", response_class=HTMLResponse)
async def login_form(request: Request, next: str | None = None) -> Response:
    g = gate(request)
    root = request.scope.get("root_path", "")
    if g.trusted:
        return RedirectResponse(safe_next(root, next), status_code=303)
    return renderer_of(request)(
        request, ANONYMOUS, "login.html", next=safe_next(root, next), error=None
    )


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request, token: str = Form(""), next: str = Form("")) -> Response:
    g = gate(request)
    root = request.scope.get("root_path", "")
    if not g.trusted and not g.token_matches(token.strip()):
        await asyncio.sleep(FAILED_LOGIN_DELAY_S)
        return renderer_of(request)(
            request,
            ANONYMOUS,
            "login.html",
            status=401,
            next=safe_next(root, next),
            error="That is not this agent's API token.",
        )
    session = g.sessions.create()
    response = RedirectResponse(safe_next(root, next), status_code=303, headers=SECURITY_HEADERS)
    set_cookie(response, session, request)
    return response


@router.post("/logout")
async def logout(request: Request, _session: ChangingSession) -> Response:
    g = gate(request)
    g.sessions.end(request.cookies.get(COOKIE))
    root = request.scope.get("root_path", "")
    target = f"{root}/" if g.trusted else f"{root}/login"
    response = RedirectResponse(target, status_code=303, headers=SECURITY_HEADERS)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return response
