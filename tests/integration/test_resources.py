"""Reservations, sampling, alerts and the CLI against a real agent and real QEMU guests (TCG)."""

from __future__ import annotations

import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from typer.testing import CliRunner

from stoker.cli.main import app
from stoker.domain.units import MiB
from stoker.wire import AllocationOut
from tests.helpers import AgentProcess, free_port, guest_spec, http_get, wait_for

pytestmark = pytest.mark.integration

#: 400 MiB of node memory keeps 20% back: 320 MiB reservable, room for two 128 MiB guests
TIGHT = {
    "STOKER_RESOURCES__HOST_MEMORY_MIB": "400",
    "STOKER_RESOURCES__HOST_CPUS": "8",
    "STOKER_RESOURCES__INTERVAL_S": "1",
}


def _start_raw(socket: str, name: str) -> httpx.Response:
    with httpx.Client(transport=httpx.HTTPTransport(uds=socket), timeout=60) as http:
        return http.post(f"http://stoker/api/v1/vms/{name}/start", params={"wait": False})


def test_concurrent_starts_reserve_exactly_what_fits_and_survive_agent_restart():
    agent = AgentProcess(env=TIGHT).start()
    try:
        names = [f"race-{i}" for i in range(6)]
        with agent.client() as api:
            for name in names:
                api.create_vm(guest_spec(name))
        with ThreadPoolExecutor(len(names)) as pool:
            answers = list(pool.map(lambda n: _start_raw(str(agent.socket), n), names))
        codes = sorted(a.status_code for a in answers)
        assert codes == [202, 202, 409, 409, 409, 409], [a.text for a in answers]
        for refused in (a for a in answers if a.status_code == 409):
            body = refused.json()
            assert body["resource"] == "memory"
            assert "not enough memory: asked for 128 MiB, 64 MiB free of 320 MiB" in body["detail"]
        started = [a.json()["name"] for a in answers if a.status_code == 202]
        with agent.client() as api:
            report = api.resources()
            assert report.allocated == AllocationOut(vms=2, vcpus=2, memory_bytes=256 * MiB)
            assert report.available.memory_bytes == 64 * MiB
            assert sorted(v.name for v in report.vms) == sorted(started)
            for name in started:
                wait_for(lambda n=name: api.get_vm(n).state == "running", 90, 0.2)

        # reservations are rows in the database: a restarted agent still counts them
        agent.signal(signal.SIGTERM)
        agent = AgentProcess(data_dir=agent.data_dir, env=TIGHT).start()
        with agent.client() as api:
            assert api.resources().allocated.vms == 2
            refused_name = next(n for n in names if n not in started)
            with pytest.raises(Exception) as caught:
                api.start_vm(refused_name, wait=False)
            assert getattr(caught.value, "status", None) == 409
            for name in started:
                assert api.stop_vm(name, graceful=False).state == "stopped"
            assert api.resources().allocated == AllocationOut(vms=0, vcpus=0, memory_bytes=0)
    finally:
        agent.cleanup()


def _recent_cpu(api, name: str, seconds: int = 4) -> float:
    points = [p.cpu_percent for p in api.vm_metrics(name, "30s").history]
    values = [v for v in points[-seconds:] if v is not None]
    assert values, f"no CPU samples for {name}"
    return sum(values) / len(values)


def test_real_guests_cpu_memory_disk_and_alerts(tmp_path):
    env = {
        "STOKER_RESOURCES__INTERVAL_S": "1",
        "STOKER_RESOURCES__HOST_CPUS": "1",
        "STOKER_RESOURCES__CPU_ALERT": "0.25",
        "STOKER_RESOURCES__MEMORY_ALERT": "9",  # out of reach: this test watches CPU alerts
    }
    agent = AgentProcess(env=env).start()
    disk = agent.images / "data.img"
    subprocess.run(["truncate", "-s", "64M", str(disk)], check=True)
    try:
        with agent.client() as api:
            busy_port, idle_port = free_port(), free_port()
            busy = guest_spec("busy", busy_port, drives=[{"path": str(disk)}], memory_mib=512)
            busy["cmdline"] += " stoker.mkfs=1"
            api.create_vm(busy)
            api.create_vm(guest_spec("idle", idle_port))
            for name in ("busy", "idle"):
                assert api.start_vm(name, wait=True, timeout_s=90).state == "running"
            for port in (busy_port, idle_port):
                wait_for(lambda p=port: http_get(f"http://127.0.0.1:{p}/health"), 30)
            time.sleep(4)  # let the boot's own CPU settle out of the window

            # null with a reason, never a made-up zero
            idle = api.vm_metrics("idle").latest
            assert idle.net_rx_bytes is None
            assert idle.unavailable["net_rx_bytes"] == (
                "user-mode networking has no host-side counters"
            )
            assert (
                idle.disk_write_bytes is None
                and "no drives" in idle.unavailable["disk_write_bytes"]
            )
            assert idle.memory_bytes > 64 * MiB

            # CPU: a busy loop in one guest shows well above the idle one
            assert http_get(f"http://127.0.0.1:{busy_port}/cgi-bin/burn?seconds=12", 5)
            time.sleep(6)
            busy_cpu, idle_cpu = _recent_cpu(api, "busy"), _recent_cpu(api, "idle")
            # under TCG on two cores shared with other work the burn gets 35-100% of a core
            assert busy_cpu > 20 and busy_cpu > 4 * idle_cpu, (busy_cpu, idle_cpu)
            raised = wait_for(lambda: api.events(type="alert.raised"), 15, 0.5)
            assert raised[0].data["resource"] == "cpu"
            assert any(a.resource == "cpu" and a.active for a in api.resources().alerts)
            cleared = wait_for(lambda: api.events(type="alert.cleared"), 40, 0.5)
            assert cleared[0].data["resource"] == "cpu"

            # memory: RSS grows when the guest touches 64 MiB it had never used (the busy guest
            # has 512 MiB: a 128 MiB guest has touched nearly all of its RAM by the end of boot)
            before = api.vm_metrics("busy").latest.memory_bytes
            assert http_get(f"http://127.0.0.1:{busy_port}/cgi-bin/alloc?mb=64", 30)
            time.sleep(2.5)
            after = api.vm_metrics("busy").latest.memory_bytes
            assert after - before > 24 * MiB, (before, after)  # some pages were touched at boot

            # disk: QMP block stats count what dd wrote
            written0 = api.vm_metrics("busy").latest.disk_write_bytes
            assert written0 is not None
            assert http_get(f"http://127.0.0.1:{busy_port}/cgi-bin/dd?mb=8", 60)
            time.sleep(2.5)
            written1 = api.vm_metrics("busy").latest.disk_write_bytes
            assert written1 - written0 >= 8 * MiB, (written0, written1)

            # history, the per-VM list, and prediction are all there
            report = api.resources(history="10m")
            assert len(report.history) >= 10
            assert {p.resource for p in report.predictions} >= {
                "cpu_allocated", "memory_allocated", "cpu_used", "memory_used",
            }  # fmt: skip
            assert {v.name for v in api.vms_metrics().vms} == {"busy", "idle"}

            # the CLI shows the same, through the same API
            runner = CliRunner()
            top = runner.invoke(app, ["--socket", str(agent.socket), "top", "--once"])
            assert top.exit_code == 0, top.output
            assert "busy" in top.output and "idle" in top.output and "%" in top.output
            shown = runner.invoke(app, ["--socket", str(agent.socket), "resources"])
            assert shown.exit_code == 0, shown.output
            assert "Node capacity" in shown.output and "Available:" in shown.output
            assert "busy: 1 vCPUs, 512 MiB" in shown.output
            assert any(c in shown.output for c in "▁▂▃▄▅▆▇█")
    finally:
        agent.cleanup()


def test_stopped_vm_metrics_say_why(agent):
    with agent.client() as api:
        api.create_vm(guest_spec("never-started"))
        answer = api.vm_metrics("never-started")
        assert answer.latest is None
        assert "pending" in answer.latest_unavailable_reason
        bad = httpx.Client(transport=httpx.HTTPTransport(uds=str(agent.socket)))
        r = bad.get("http://stoker/api/v1/resources", params={"history": True, "duration": "1x"})
        assert r.status_code == 422 and "duration" in r.json()["detail"]
