"""/metrics passes promtool, and a real Prometheus server scrapes it over TCP with a token."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request

import httpx
import pytest

from tests.helpers import AgentProcess, free_port, guest_spec, short_tmpdir, wait_for

pytestmark = pytest.mark.integration

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
TOKEN = "prom-test-token-" + "p" * 32  # the agent refuses tokens under 32 bytes


@pytest.fixture
def tcp_agent(guest):
    port = free_port()
    agent = AgentProcess(
        env={
            "STOKER_API__TCP_PORT": str(port),
            "STOKER_API__TOKEN": TOKEN,
            "STOKER_RESOURCES__INTERVAL_S": "1",
        }
    ).start()
    agent.tcp_port = port  # type: ignore[attr-defined]
    try:
        with agent.client() as api:
            api.create_vm(guest_spec("scraped"))  # a registered VM: states and restarts show
        yield agent
    finally:
        agent.cleanup()


def _scrape(port: int, token: str | None = TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(f"http://127.0.0.1:{port}/metrics", headers=headers, timeout=10)


@pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian package prometheus) not installed")
def test_metrics_pass_promtool(tcp_agent):
    assert _scrape(tcp_agent.tcp_port, token=None).status_code == 401
    answer = _scrape(tcp_agent.tcp_port)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = answer.text
    for name in (
        "stoker_node_capacity_vcpus",
        "stoker_node_allocated_memory_bytes",
        'stoker_vms{state="pending"} 1.0',
        'stoker_vm_restarts{id="',
        'stoker_alert_active{resource="cpu"}',
    ):
        assert name in text
    lint = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )  # type: ignore[list-item]
    assert lint.returncode == 0, lint.stdout + lint.stderr


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus (Debian package) not installed")
def test_real_prometheus_scrapes_the_agent(tcp_agent):
    workdir = short_tmpdir("prom-")
    web_port = free_port()
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n"
        "  - job_name: stoker\n"
        "    authorization:\n      type: Bearer\n"
        f"      credentials: {TOKEN}\n"
        "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{tcp_agent.tcp_port}']\n"
    )
    log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 - closed in finally
    server = subprocess.Popen(
        [
            PROMETHEUS,  # type: ignore[list-item]
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{web_port}",
        ],
        stdout=log,
        stderr=log,
    )

    def query(expr: str) -> list[dict]:
        url = f"http://127.0.0.1:{web_port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                return json.loads(answer.read())["data"]["result"]
        except OSError:
            return []

    try:
        found = wait_for(lambda: query('stoker_vms{state="pending"}'), 60, 0.5)
        assert found[0]["value"][1] == "1"
        assert found[0]["metric"]["job"] == "stoker"
        vcpus = wait_for(lambda: query("stoker_node_capacity_vcpus"), 30, 0.5)
        assert float(vcpus[0]["value"][1]) >= 2
        up = wait_for(lambda: query('up{job="stoker"} == 1'), 30, 0.5)
        assert up, "the scrape target is not up (bad token?)"
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)
