"""The web console's VM list with 200 registered VMs: how long the page takes.

Two figures, each measured first with no VMs (the baseline) and then with ``--vms``
registered (never started: a pending VM costs the page a row, like any other):

- server: GET /ui/ over the Unix socket, time to the whole HTML answer (``--rounds`` times,
  one client, sequential);
- browser: headless Chromium (Debian's) loading the page over the agent's TCP listener, from
  navigation to the load event (htmx, uPlot and the stylesheet included, after one warm-up
  load fills the browser's cache), ``--loads`` times.

Target: the list page loads in under 300 ms with 200 VMs. Prints a table; writes nothing.

    .venv/bin/python -m bench.console [--vms 200] [--rounds 50] [--loads 20]
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import time

import httpx

from bench.report import median, percentile, record
from tests.helpers import AgentProcess, free_port, guest_spec, short_tmpdir

TARGET_MS = 300.0


def server_times(agent: AgentProcess, rounds: int) -> list[float]:
    transport = httpx.HTTPTransport(uds=str(agent.socket))
    times = []
    with httpx.Client(base_url="http://stoker", transport=transport, timeout=60) as http:
        http.get("/ui/").raise_for_status()  # a session, and templates compiled
        for _ in range(rounds):
            began = time.perf_counter()
            answer = http.get("/ui/")
            times.append((time.perf_counter() - began) * 1000)
            answer.raise_for_status()
    return times


def browser_times(url: str, token: str, loads: int) -> list[float]:
    from playwright.sync_api import sync_playwright

    times = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(url + "/ui/login")
        page.fill("#token", token)
        page.click("button[type=submit]")
        page.wait_for_selector("#vm-rows")
        page.goto(url + "/ui/", wait_until="load")  # warm: the browser's cache holds the scripts
        for _ in range(loads):
            page.goto(url + "/ui/", wait_until="load")
            timing = page.evaluate(
                "(() => { const n = performance.getEntriesByType('navigation')[0];"
                " return n.loadEventEnd - n.startTime; })()"
            )
            times.append(float(timing))
        browser.close()
    return times


def measure(
    agent: AgentProcess, url: str, token: str, args: argparse.Namespace
) -> dict[str, float]:
    served = server_times(agent, args.rounds)
    result = {"server_p50": median(served), "server_p95": percentile(served, 95)}
    if not args.no_browser:
        loaded = browser_times(url, token, args.loads)
        result.update(browser_p50=median(loaded), browser_p95=percentile(loaded, 95))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vms", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--loads", type=int, default=20)
    parser.add_argument("--no-browser", action="store_true", help="server times only")
    parser.add_argument("--no-record", action="store_true", help="do not write BENCHMARKS.md")
    args = parser.parse_args()

    where = short_tmpdir("stk-bench-tok-")
    token = secrets.token_hex(32)
    (where / "token").write_text(token)
    (where / "token").chmod(0o600)
    port = free_port()
    agent = AgentProcess(
        env={
            "STOKER_API__TCP_PORT": str(port),
            "STOKER_API__TOKEN_FILE": str(where / "token"),
            "STOKER_RESOURCES__MAX_VMS": str(max(50, args.vms * 2)),
        }
    ).start()
    url = f"http://127.0.0.1:{port}"
    try:
        base = measure(agent, url, token, args)
        with agent.client() as api:
            for i in range(args.vms):
                api.create_vm(guest_spec(f"vm-{i:03d}"))
        full = measure(agent, url, token, args)
    finally:
        agent.cleanup()
        shutil.rmtree(where, ignore_errors=True)

    labels = {
        "server_p50": "GET /ui/ p50, server (ms)",
        "server_p95": "GET /ui/ p95, server (ms)",
        "browser_p50": "page load p50, Chromium (ms)",
        "browser_p95": "page load p95, Chromium (ms)",
    }
    lines = [
        f"The VM list page (`/ui/`) with none and with {args.vms} registered VMs, over TCP "
        f"with a console session; {args.rounds} server requests, {args.loads} page loads in "
        "headless Chromium (to the load event).",
        "",
        f"| measure | no VMs | {args.vms} VMs | target |",
        "|---|---|---|---|",
    ]
    for key, label in labels.items():
        if key not in full:
            continue
        goal = ""
        if key in ("server_p95", "browser_p95"):
            goal = f"< {TARGET_MS:g} " + ("ok" if full[key] < TARGET_MS else "MISSED")
        lines.append(f"| {label} | {base[key]:.1f} | {full[key]:.1f} | {goal} |")
    print("\n".join(lines))
    if not args.no_record:
        record("Web console: list page", ".venv/bin/python -m bench.console", "\n".join(lines))


if __name__ == "__main__":
    main()
