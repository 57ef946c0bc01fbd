"""The console's sign-in and CSRF rules over ASGI (no browser): sessions expire, a TCP
listener wants the token once, every change wants the page's CSRF token; and the loopback
proxy of `stoker ui` admits one browser, once, in time."""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from stoker.agent import build_services
from stoker.api.app import create_app
from stoker.cli.ui_proxy import Admission
from stoker.config import AgentConfig
from stoker.domain.spec import VMSpec
from stoker.domain.states import VMState
from stoker.domain.vm import VM
from stoker.store.db import Database
from stoker.web.auth import safe_next
from stoker.web.sessions import IDLE_S, LIFETIME_S, MAX_SESSIONS, Sessions

TOKEN = secrets.token_hex(32)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_sessions_expire_when_idle_and_after_their_lifetime() -> None:
    clock = Clock()
    sessions = Sessions(clock)
    made = sessions.create()
    assert made.fresh and made.cookie and sessions.get(made.cookie) is not None
    clock.now += IDLE_S - 1
    assert sessions.get(made.cookie) is not None  # used: idle time starts again
    clock.now += IDLE_S + 1
    assert sessions.get(made.cookie) is None
    busy = sessions.create()
    for _ in range(int(LIFETIME_S // (IDLE_S / 2)) + 1):
        clock.now += IDLE_S / 2
        sessions.get(busy.cookie)
    assert sessions.get(busy.cookie) is None  # however busy, it ends
    assert sessions.get("forged") is None and sessions.get(None) is None


def test_sessions_are_bounded_and_hold_no_cookie() -> None:
    sessions = Sessions(Clock())
    first = sessions.create()
    for _ in range(MAX_SESSIONS):
        sessions.create()
    assert len(sessions) == MAX_SESSIONS and sessions.get(first.cookie) is None
    assert all(s.cookie == "" for s in sessions._by_key.values())


def test_after_login_only_console_pages() -> None:
    assert safe_next("/ui", "/ui/vms/abc") == "/ui/vms/abc"
    for bad in ("https://evil.example/", "//evil.example/ui/", "/ui\\..", "/api/v1/vms", None):
        assert safe_next("/ui", bad) == "/ui/"


def test_proxy_login_link_works_once_and_in_time() -> None:
    clock = Clock()
    admission = Admission(ttl_s=120, clock=clock)
    assert admission.redeem("wrong") is None
    cookie = admission.redeem(admission.secret)
    assert cookie is not None and admission.admits(cookie)
    assert admission.redeem(admission.secret) is None  # spent
    assert not admission.admits("forged") and not admission.admits(None)
    late = Admission(ttl_s=120, clock=clock)
    clock.now += 121
    assert late.redeem(late.secret) is None


@pytest.fixture
async def tcp(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The app of a TCP listener (token required) over the agent's real services."""
    db = Database(tmp_path / "s.db")
    services = build_services(AgentConfig(data_dir=tmp_path), db, drivers={})
    now = datetime.now(UTC)
    spec = VMSpec.model_validate({"name": "web", "kernel": "/k"})
    services.directory.store.insert(VM("a" * 16, "web", spec, VMState.STOPPED, "stopped", now, now))
    app = create_app(services, token=TOKEN)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://stoker"
    ) as client:
        yield client
    db.close()


async def test_tcp_console_needs_the_token_once_then_csrf(tcp: httpx.AsyncClient) -> None:
    refused = await tcp.get("/ui/vms/web")
    assert refused.status_code == 303 and refused.headers["location"].startswith("/ui/login")
    assert (await tcp.get("/api/v1/events/stream")).status_code == 401
    form = await tcp.get("/ui/login")
    assert form.status_code == 200 and 'name="token"' in form.text
    signed_in = await tcp.post("/ui/login", data={"token": TOKEN, "next": "/ui/vms/web"})
    assert signed_in.status_code == 303 and signed_in.headers["location"] == "/ui/vms/web"
    page = await tcp.get("/ui/vms/web")
    assert (
        page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    )
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf is not None
    # a change without the token is refused; with it, it is made (a snapshot of a VM
    # without a hypervisor driver fails, and the page says why)
    assert (await tcp.post("/ui/vms/web/start")).status_code == 403
    bad = await tcp.post("/ui/vms/web/start", headers={"X-CSRF-Token": "nope"})
    assert bad.status_code == 403
    done = await tcp.post(
        "/ui/vms/web/start", headers={"X-CSRF-Token": csrf.group(1), "HX-Request": "true"}
    )
    assert done.status_code == 200 and 'role="alert"' in done.text
    plain = await tcp.post("/ui/vms/web/start", data={"csrf": csrf.group(1)})
    assert plain.status_code == 303  # a form without htmx goes back to the page
    out = await tcp.post("/ui/logout", data={"csrf": csrf.group(1)})
    assert out.status_code == 303
    assert (await tcp.get("/ui/vms/web")).status_code == 303


async def test_an_unknown_vm_is_a_page_saying_so(tcp: httpx.AsyncClient) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    missing = await tcp.get("/ui/vms/nosuchvm", headers=headers)
    assert missing.status_code == 404 and "no VM named" in missing.text


async def test_bearer_token_is_a_session_too(tcp: httpx.AsyncClient) -> None:
    """`stoker ui` in front of a TCP agent sends the token; the console takes it."""
    page = await tcp.get("/ui/", headers={"Authorization": f"Bearer {TOKEN}"})
    assert page.status_code == 200 and "stoker_session=" in page.headers["set-cookie"]
