"""The web console in a real browser (Debian's Chromium, headless, driven by Playwright over
the DevTools protocol) against a real agent with real guests.

On the agent's TCP listener: the token is exchanged once for a session cookie, the VM list
follows a start made from the CLI without a reload, a chart has points, buttons change a
VM's state, requests without the session are refused, and the browser asks nothing of any
host but the agent. Screenshots of every page land in tests/artifacts/console/ (git-ignored)
and must not be blank; with STOKER_UPDATE_SCREENSHOTS=1 the VM page is also written to
docs/images/vm-page.png, the README's picture.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from stoker.web.assets import Vendor
from tests.helpers import REPO, AgentProcess, free_port, guest_spec, short_tmpdir, wait_for
from tests.png_check import assert_not_blank

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("chromium") is None,
        reason="needs Debian's chromium (make sysdeps installs it)",
    ),
]

playwright_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip)")

ARTIFACTS = REPO / "tests" / "artifacts" / "console"
DOCS_SCREENSHOT = REPO / "docs" / "images" / "vm-page.png"
CHROMIUM_ARGS = [
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-default-apps",
]


class Console:
    """The agent under test: its TCP URL, token and Unix socket."""

    def __init__(self, agent: AgentProcess, url: str, token: str) -> None:
        self.agent = agent
        self.url = url
        self.token = token

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The real CLI, as its own process, on the Unix socket."""
        return subprocess.run(
            [sys.executable, "-m", "stoker.cli.main", "--socket", str(self.agent.socket), *args],
            capture_output=True,
            text=True,
            timeout=120,
        )


@pytest.fixture(scope="module")
def console(guest) -> Iterator[Console]:
    missing = Vendor().missing()
    assert not missing, f"the console's libraries are not installed ({missing}): run `make web`"
    secrets_dir = short_tmpdir("stk-tok-")
    token = secrets.token_hex(32)
    token_file = secrets_dir / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    port = free_port()
    agent = AgentProcess(
        env={
            "STOKER_API__TCP_PORT": str(port),
            "STOKER_API__TOKEN_FILE": str(token_file),
            "STOKER_RESOURCES__INTERVAL_S": "1",
        }
    ).start()
    try:
        with agent.client() as api:
            api.create_vm(guest_spec("web", port=free_port()))
            api.create_vm(guest_spec("idle"))
            api.start_vm("web", wait=True, timeout_s=90)
            # what a VM's page has to show: a quota (its memory limit is the chart's limit
            # line), a schedule, a snapshot
            api.set_quota("web", cpu_percent=100, memory_mib=512)
            api.create_schedule("snapshot", "0 3 * * *", vm="web", name="nightly")
            api.create_snapshot("web", tags=["before-upgrade"])
        yield Console(agent, f"http://127.0.0.1:{port}", token)
    finally:
        agent.cleanup()
        shutil.rmtree(secrets_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(
            executable_path=shutil.which("chromium"), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            chromium.close()


class Watched:
    """A page whose every request host and console complaint is recorded."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.hosts: set[str] = set()
        self.problems: list[str] = []
        page.on("request", lambda r: self.hosts.add(httpx.URL(r.url).netloc.decode()))
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on(
            "console",
            lambda m: self.problems.append(m.text) if m.type in ("error", "warning") else None,
        )
        page.on("dialog", lambda d: d.accept())  # confirmations of destructive actions

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        assert_not_blank(path)
        return path


def _state(page: Any, selector: str) -> str:
    return str(page.get_attribute(selector, "data-state") or "")


# ------------------------------------------------------------------------ refusals


def test_console_refuses_requests_without_a_session(console: Console) -> None:
    with httpx.Client(base_url=console.url, timeout=10) as http:
        page = http.get("/ui/")
        assert page.status_code == 303 and page.headers["location"].startswith("/ui/login")
        fragment = http.get("/ui/vms/rows", headers={"HX-Request": "true"})
        assert fragment.status_code == 401 and "/ui/login" in fragment.headers["HX-Redirect"]
        assert http.post("/ui/vms/web/stop").status_code == 303  # to the login, not stopped
        assert http.get("/api/v1/events/stream").status_code == 401
        assert http.get("/api/v1/vms").status_code == 401
        wrong = http.post("/ui/login", data={"token": "x" * 64, "next": "/ui/"})
        assert wrong.status_code == 401 and "stoker_session" not in wrong.headers.get(
            "set-cookie", ""
        )
        # signed in, a change still needs the page's CSRF token
        login = http.post("/ui/login", data={"token": console.token, "next": "/ui/"})
        assert login.status_code == 303
        cookie = login.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "max-age=" in cookie
        assert http.get("/ui/").status_code == 200
        assert http.post("/ui/vms/web/stop").status_code == 403
        # a session reads the event stream (the browser's EventSource), never the rest
        assert http.get("/api/v1/vms").status_code == 401
        with http.stream("GET", "/api/v1/events/stream") as stream:
            assert stream.status_code == 200
    with console.agent.client() as api:
        assert api.get_vm("web").state == "running"


# ------------------------------------------------------------------- in a browser


def test_console_in_a_browser(console: Console, browser: Any) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    watched = Watched(context.new_page())
    page = watched.page

    # sign in: the token once, for a session cookie
    page.goto(console.url + "/ui/")
    page.wait_for_selector("#token")
    watched.shot("login")
    page.fill("#token", console.token)
    page.click("button[type=submit]")
    page.wait_for_selector("#vm-rows")
    cookie = next(c for c in context.cookies() if c["name"] == "stoker_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["expires"] > 0

    # the list follows a VM started from the CLI, without a reload
    idle = console.agent.client().get_vm("idle")
    row = f"#vm-{idle.id}"
    assert _state(page, row) == "pending"
    page.evaluate("window.notReloaded = true")
    started = console.cli("vm", "start", "idle", "--no-wait")
    assert started.returncode == 0, started.stderr
    # (selectors, not script: the console's content security policy forbids eval)
    page.wait_for_selector(f"{row}:is([data-state=starting], [data-state=running])", timeout=20_000)
    page.wait_for_selector(f"{row}[data-state=running]", timeout=90_000)
    assert page.evaluate("window.notReloaded") is True
    watched.shot("vm-list")

    # the VM page: a chart with points (samples every second), the prediction drawn
    web = console.agent.client().get_vm("web")
    wait_for(lambda: len(console.agent.client().vm_metrics("web").history) >= 3, 30, 0.5)
    page.goto(f"{console.url}/ui/vms/{web.id}")
    page.wait_for_selector("#vm-memory .plot canvas")
    assert int(page.get_attribute("#vm-cpu", "data-points") or 0) >= 3
    assert int(page.get_attribute("#vm-memory", "data-points") or 0) >= 3
    assert page.locator("#vm-memory .u-legend").inner_text().count("trend") == 1
    for section in ("State timeline", "Health", "Quota", "Snapshots", "Schedules", "Console"):
        assert page.get_by_role("heading", name=section).is_visible()
    assert "STOKER-GUEST-READY" in page.locator("pre.console").inner_text()
    page.click("#charts .ranges >> text=24h")
    page.wait_for_selector("#charts .ranges a[aria-current]:has-text('24h')")
    page.wait_for_selector("#vm-memory .plot canvas")
    watched.shot("vm-page")
    if os.environ.get("STOKER_UPDATE_SCREENSHOTS") == "1":
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(DOCS_SCREENSHOT))  # the first 1280x800, as a person sees it
        assert_not_blank(DOCS_SCREENSHOT)

    # keyboard: Tab reaches the actions
    page.focus("body")
    for _ in range(30):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "action-stop":
            break
    else:
        raise AssertionError("Tab never reached the Stop button")

    # buttons change the state: stop (confirmed), then a snapshot of the stopped VM
    page.goto(f"{console.url}/ui/vms/{idle.id}")
    page.wait_for_selector("#vm-state[data-state=running]")
    page.click("#action-stop")
    page.wait_for_selector("#vm-state[data-state=stopped]", timeout=30_000)
    with console.agent.client() as api:
        assert api.get_vm("idle").state == "stopped"
    page.click("#action-snapshot")
    page.wait_for_selector("tr[data-snapshot]", timeout=30_000)
    page.click("tr[data-snapshot] >> text=Protect")
    page.wait_for_selector("tr[data-snapshot] .tag:has-text('protected')")
    with console.agent.client() as api:
        assert [s.protected for s in api.list_snapshots("idle")] == [True]

    # the host page: capacity, prediction, charts
    page.goto(console.url + "/ui/host")
    page.wait_for_selector("#host-memory .plot canvas")
    assert page.get_by_role("heading", name="Prediction").is_visible()
    watched.shot("host")

    # a phone: nothing wider than the screen but the tables' own scroll areas
    phone = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    phone.add_cookies([c for c in context.cookies() if c["name"] == "stoker_session"])
    small = Watched(phone.new_page())
    small.page.goto(f"{console.url}/ui/vms/{web.id}")
    small.page.wait_for_selector("#vm-memory .plot canvas")
    overflow = small.page.evaluate(
        "document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 1, f"the page is {overflow}px wider than a phone screen"
    small.shot("vm-page-phone")
    phone.close()

    # everything came from the agent itself; no script or policy complained
    agent_host = httpx.URL(console.url).netloc.decode()
    assert watched.hosts == {agent_host}, watched.hosts
    assert small.hosts == {agent_host}, small.hosts
    assert watched.problems == [] and small.problems == [], watched.problems + small.problems
    context.close()


# -------------------------------------------------------------------------- stoker ui


def test_stoker_ui_serves_the_unix_socket_on_loopback(console: Console, browser: Any) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "stoker.cli.main", "--socket", str(console.agent.socket),
         "ui", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        printed = proc.stdout.readline()
        link = re.search(r"http://127\.0\.0\.1:\d+/ui-login/\S+", printed)
        assert link is not None, printed
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _answers(base), 10, 0.1)
        with httpx.Client(timeout=10) as http:
            assert http.get(base + "/ui/").status_code == 401  # no login yet
            forged = http.get(base + "/ui/", headers={"Host": f"evil.example:{port}"})
            assert forged.status_code == 403
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        watched = Watched(context.new_page())
        watched.page.goto(link.group(0))
        watched.page.wait_for_selector("#vm-rows tr[data-state]")
        assert watched.page.url == base + "/ui/"
        # the one-time link is spent: another browser cannot use it
        with httpx.Client(timeout=10) as http:
            assert http.get(link.group(0)).status_code == 403
        watched.page.goto(base + "/ui/host")
        watched.page.wait_for_selector("#host-memory")
        assert watched.hosts == {f"127.0.0.1:{port}"}, watched.hosts
        assert watched.problems == [], watched.problems
        context.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _answers(base: str) -> bool:
    try:
        httpx.get(base + "/ui/", timeout=1)
    except httpx.HTTPError:
        return False
    time.sleep(0)
    return True
