"""Health, auto-recovery and watchdogs, end to end: a real agent process and real QEMU guests."""

from __future__ import annotations

import os
import signal
import time
from datetime import UTC, datetime

import pytest
from typer.testing import CliRunner

from stoker.cli.main import app
from tests.helpers import AgentProcess, free_port, guest_spec, http_get, pid_alive, wait_for

pytestmark = pytest.mark.integration


def state_of(api, name):
    return api.get_vm(name)["state"]


def events_of(api, name, type_):
    return api.events(vm=name, type=type_, limit=1000)


def test_sigkill_restart_then_sigstop_unhealthy_restart_and_counters_survive(agent):
    port = free_port()
    spec = guest_spec(
        "phoenix",
        port,
        restart={"policy": "on-failure", "backoff_initial_s": 0.2, "stable_after_s": 3600},
        probes=[{"kind": "vmm", "name": "qmp", "interval_s": 0.5, "timeout_s": 0.25}],
    )
    with agent.client() as api:
        api.create_vm(spec)
        vm = api.start_vm("phoenix", wait=True, timeout_s=90)
        assert vm["state"] == "running", vm
        first_pid = vm["process"]["pid"]

        # 1. SIGKILL: error within a second, with the signal in the reason
        killed = datetime.now(UTC)
        os.kill(first_pid, signal.SIGKILL)
        wait_for(
            lambda: any(
                e["data"].get("to_state") == "error" for e in events_of(api, "phoenix", "vm.state")
            ),
            5,
        )
        error = next(
            e for e in events_of(api, "phoenix", "vm.state") if e["data"]["to_state"] == "error"
        )
        assert error["data"]["reason"] == "VMM killed by SIGKILL"
        at = datetime.fromisoformat(error["at"].replace("Z", "+00:00"))
        assert (at - killed).total_seconds() < 1.0, "death must be seen at once (pidfd)"
        # ... and restarted under on-failure: the guest answers again from a new VMM
        assert wait_for(lambda: http_get(f"http://127.0.0.1:{port}/health"), 60)
        vm = wait_for(lambda: (v := api.get_vm("phoenix"))["state"] == "running" and v, 30)
        assert vm["state"] == "running" and vm["process"]["pid"] != first_pid
        assert vm["restart"]["count"] == 1 and vm["restart"]["last_restart_at"]
        assert vm["restart"]["next_retry_at"] is None
        scheduled = events_of(api, "phoenix", "vm.restart_scheduled")
        assert scheduled[-1]["data"]["attempt"] == 1 and scheduled[-1]["data"]["delay_s"] == 0.2
        wait_for(lambda: api.vm_health("phoenix")["health"] == "healthy", 30)
        checks_before = api.vm_health("phoenix")["probes"][0]["checks"]

    # 2. the agent restarts: counters and health history are still there
    agent.signal(signal.SIGTERM)
    agent.start()
    with agent.client() as api:
        vm = api.get_vm("phoenix")
        assert vm["state"] == "running"
        assert vm["restart"]["count"] == 1 and vm["restart"]["last_restart_at"]
        probe = api.vm_health("phoenix")["probes"][0]
        assert probe["name"] == "qmp" and probe["checks"] >= checks_before
        assert len(probe["history"]) >= 1
        second_pid = vm["process"]["pid"]

        # 3. SIGSTOP: the vmm probe fails three times -> unhealthy -> killed and restarted
        os.kill(second_pid, signal.SIGSTOP)
        wait_for(
            lambda: (
                events_of(api, "phoenix", "vm.health")
                and any(
                    e["data"]["to_health"] == "unhealthy"
                    for e in events_of(api, "phoenix", "vm.health")
                )
            ),
            30,
        )
        unhealthy = next(
            e
            for e in events_of(api, "phoenix", "vm.health")
            if e["data"]["to_health"] == "unhealthy"
        )
        assert "qmp failed 3 times" in unhealthy["data"]["reason"]
        wait_for(lambda: not pid_alive(second_pid), 30)
        assert wait_for(lambda: http_get(f"http://127.0.0.1:{port}/health"), 60)
        vm = wait_for(lambda: (v := api.get_vm("phoenix"))["state"] == "running" and v, 30)
        assert vm["state"] == "running" and vm["process"]["pid"] not in (first_pid, second_pid)
        assert vm["restart"]["count"] == 2
        restarts = events_of(api, "phoenix", "vm.auto_restart")
        assert [e["data"]["stop_reason"] for e in restarts] == ["error", "unhealthy"]


def test_http_probe_marks_the_vm_unhealthy_when_the_service_stops(agent):
    port = free_port()
    url = f"http://127.0.0.1:{port}/health"
    spec = guest_spec(
        "quiet",
        port,
        probes=[{"kind": "http", "url": url, "interval_s": 0.5, "timeout_s": 0.25}],
    )
    with agent.client() as api:
        api.create_vm(spec)
        assert api.start_vm("quiet", wait=True, timeout_s=90)["state"] == "running"
        wait_for(lambda: api.vm_health("quiet")["health"] == "healthy", 30)
        assert http_get(f"http://127.0.0.1:{port}/cgi-bin/stop-http", timeout=5)
        report = wait_for(lambda: (h := api.vm_health("quiet"))["health"] == "unhealthy" and h, 30)
        kinds = {p["kind"]: p for p in report["probes"]}
        assert kinds["vmm"]["status"] == "healthy"  # the implicit VMM probe: QEMU is fine
        probe = kinds["http"]
        assert probe["status"] == "unhealthy"
        assert probe["consecutive_failures"] >= 3
        assert report["last_error"] and url in report["last_error"]
        # policy "never": unhealthy is reported, nothing is restarted
        assert state_of(api, "quiet") == "running"
        assert events_of(api, "quiet", "vm.auto_restart") == []
        # the live stream replays from an id, then follows
        stream = api.stream_events(vm="quiet", type="vm.health", after=0)
        seen = [next(stream)["data"]["to_health"], next(stream)["data"]["to_health"]]
        assert seen == ["healthy", "unhealthy"]
    # and the CLI shows the same log
    shown = CliRunner().invoke(
        app, ["--socket", str(agent.socket), "events", "--vm", "quiet", "--type", "vm.health"]
    )
    assert shown.exit_code == 0, shown.output
    assert "unknown -> healthy" in shown.output and "healthy -> unhealthy" in shown.output
    health = CliRunner().invoke(app, ["--socket", str(agent.socket), "vm", "health", "quiet"])
    assert "unhealthy" in health.output and "http-0" in health.output


def test_a_vm_failing_every_boot_backs_off_and_stops_at_max_retries(agent, guest):
    spec = guest_spec(
        "doomed",
        cmdline=guest.cmdline + " stoker.fail=1",
        restart={"policy": "on-failure", "max_retries": 3, "backoff_initial_s": 0.5},
    )
    with agent.client() as api:
        api.create_vm(spec)
        api.start_vm("doomed", wait=False)
        wait_for(lambda: events_of(api, "doomed", "vm.restart_limit_reached"), 120, 0.2)
        delays = [e["data"]["delay_s"] for e in events_of(api, "doomed", "vm.restart_scheduled")]
        assert delays == [0.5, 1.0, 2.0]
        vm = api.get_vm("doomed")
        assert vm["state"] == "error"
        assert vm["state_reason"].startswith("restart limit reached (3 restarts)")
        assert "during boot" in vm["state_reason"]
        assert vm["restart"]["count"] == 3 and vm["restart"]["next_retry_at"] is None
        # the gaps between boots grow
        starts = [
            e["at"]
            for e in events_of(api, "doomed", "vm.state")
            if e["data"]["to_state"] == "starting"
        ]
        assert len(starts) == 4


def test_boot_watchdog_moves_a_vm_that_never_gets_ready_to_error(guest):
    proc = AgentProcess(
        env={"STOKER_HEALTH__STARTING_TIMEOUT_S": "3", "STOKER_HEALTH__WATCHDOG_INTERVAL_S": "0.2"}
    ).start()
    try:
        with proc.client() as api:
            # its own boot timeout (60 s) is far away: only the watchdog can end this
            api.create_vm(guest_spec("mute", ready_marker="NEVER-PRINTED", boot_timeout_s=60))
            began = time.monotonic()
            vm = api.start_vm("mute", wait=True, timeout_s=30)
            took = time.monotonic() - began
            assert vm["state"] == "error"
            assert vm["state_reason"].startswith("watchdog: starting for")
            assert "limit 3 s" in vm["state_reason"]
            assert 3 <= took < 10
            assert vm["process"] is None
            assert events_of(api, "mute", "vm.watchdog")
    finally:
        proc.cleanup()
