"""Health, auto-recovery and watchdogs, end to end: a real agent process and real QEMU guests."""

from __future__ import annotations

import os
import signal
import time
from datetime import UTC, datetime

import pytest
from typer.testing import CliRunner

from stoker.cli.main import app
from stoker.client import Client
from stoker.guest.build import GuestImage
from stoker.wire import EventOut
from tests.helpers import AgentProcess, free_port, guest_spec, http_get, pid_alive, wait_for

pytestmark = pytest.mark.integration


def state_of(api: Client, name: str) -> str:
    return str(api.get_vm(name).state)


def events_of(api: Client, name: str, type_: str) -> list[EventOut]:
    return api.events(vm=name, type=type_, limit=1000)


def at(event: EventOut) -> datetime:
    """When the agent logged an event (UTC, microseconds)."""
    return event.at


def test_sigkill_restart_then_sigstop_unhealthy_restart_and_counters_survive(
    agent: AgentProcess,
) -> None:
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
        assert vm.state == "running", vm
        first_pid = vm.process.pid

        # 1. SIGKILL: error within a second, with the signal in the reason
        killed = datetime.now(UTC)
        os.kill(first_pid, signal.SIGKILL)
        wait_for(
            lambda: any(
                e.data.get("to_state") == "error" for e in events_of(api, "phoenix", "vm.state")
            ),
            5,
        )
        error = next(
            e for e in events_of(api, "phoenix", "vm.state") if e.data["to_state"] == "error"
        )
        assert error.data["reason"] == "VMM killed by SIGKILL"
        at = error.at
        assert (at - killed).total_seconds() < 1.0, "death must be seen at once (pidfd)"
        # ... and restarted under on-failure: the guest answers again from a new VMM
        assert wait_for(lambda: http_get(f"http://127.0.0.1:{port}/health"), 60)
        vm = wait_for(lambda: (v := api.get_vm("phoenix")).state == "running" and v, 30)
        assert vm.state == "running" and vm.process.pid != first_pid
        assert vm.restart.count == 1 and vm.restart.last_restart_at
        assert vm.restart.next_retry_at is None
        scheduled = events_of(api, "phoenix", "vm.restart_scheduled")
        assert scheduled[-1].data["attempt"] == 1 and scheduled[-1].data["delay_s"] == 0.2
        wait_for(lambda: api.vm_health("phoenix").health == "healthy", 30)
        checks_before = api.vm_health("phoenix").probes[0].checks

    # 2. the agent restarts: counters and health history are still there
    agent.signal(signal.SIGTERM)
    agent.start()
    with agent.client() as api:
        vm = api.get_vm("phoenix")
        assert vm.state == "running"
        assert vm.restart.count == 1 and vm.restart.last_restart_at
        probe = api.vm_health("phoenix").probes[0]
        assert probe.name == "qmp" and probe.checks >= checks_before
        assert len(probe.history) >= 1
        second_pid = vm.process.pid

        # 3. SIGSTOP: the vmm probe fails three times -> unhealthy -> killed and restarted
        os.kill(second_pid, signal.SIGSTOP)
        wait_for(
            lambda: (
                events_of(api, "phoenix", "vm.health")
                and any(
                    e.data["to_health"] == "unhealthy"
                    for e in events_of(api, "phoenix", "vm.health")
                )
            ),
            30,
        )
        unhealthy = next(
            e for e in events_of(api, "phoenix", "vm.health") if e.data["to_health"] == "unhealthy"
        )
        assert "qmp failed 3 times" in unhealthy.data["reason"]
        wait_for(lambda: not pid_alive(second_pid), 30)
        assert wait_for(lambda: http_get(f"http://127.0.0.1:{port}/health"), 60)
        vm = wait_for(lambda: (v := api.get_vm("phoenix")).state == "running" and v, 30)
        assert vm.state == "running" and vm.process.pid not in (first_pid, second_pid)
        assert vm.restart.count == 2
        restarts = events_of(api, "phoenix", "vm.auto_restart")
        assert [e.data["stop_reason"] for e in restarts] == ["error", "unhealthy"]


def test_http_probe_marks_the_vm_unhealthy_when_the_service_stops(agent: AgentProcess) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/health"
    spec = guest_spec(
        "quiet",
        port,
        probes=[{"kind": "http", "url": url, "interval_s": 0.5, "timeout_s": 0.25}],
    )
    with agent.client() as api:
        api.create_vm(spec)
        assert api.start_vm("quiet", wait=True, timeout_s=90).state == "running"
        wait_for(lambda: api.vm_health("quiet").health == "healthy", 30)
        assert http_get(f"http://127.0.0.1:{port}/cgi-bin/stop-http", timeout=5)
        report = wait_for(lambda: (h := api.vm_health("quiet")).health == "unhealthy" and h, 30)
        kinds = {p.kind: p for p in report.probes}
        assert kinds["vmm"].status == "healthy"  # the implicit VMM probe: QEMU is fine
        probe = kinds["http"]
        assert probe.status == "unhealthy"
        assert probe.consecutive_failures >= 3
        assert report.last_error and url in report.last_error
        # policy "never": unhealthy is reported, nothing is restarted
        assert state_of(api, "quiet") == "running"
        assert events_of(api, "quiet", "vm.auto_restart") == []
        # the live stream replays from an id, then follows
        stream = api.stream_events(vm="quiet", type="vm.health", after=0)
        seen = [next(stream).data["to_health"], next(stream).data["to_health"]]
        assert seen == ["healthy", "unhealthy"]
    # and the CLI shows the same log
    shown = CliRunner().invoke(
        app, ["--socket", str(agent.socket), "events", "--vm", "quiet", "--type", "vm.health"]
    )
    assert shown.exit_code == 0, shown.output
    assert "unknown -> healthy" in shown.output and "healthy -> unhealthy" in shown.output
    health = CliRunner().invoke(app, ["--socket", str(agent.socket), "vm", "health", "quiet"])
    assert "unhealthy" in health.output and "http-0" in health.output


def test_a_vm_failing_every_boot_backs_off_and_stops_at_max_retries(
    agent: AgentProcess, guest: GuestImage
) -> None:
    spec = guest_spec(
        "doomed",
        cmdline=guest.cmdline + " stoker.fail=1",
        restart={"policy": "on-failure", "max_retries": 3, "backoff_initial_s": 0.5},
    )
    with agent.client() as api:
        api.create_vm(spec)
        api.start_vm("doomed", wait=False)
        wait_for(lambda: events_of(api, "doomed", "vm.restart_limit_reached"), 120, 0.2)
        delays = [e.data["delay_s"] for e in events_of(api, "doomed", "vm.restart_scheduled")]
        assert delays == [0.5, 1.0, 2.0]
        vm = api.get_vm("doomed")
        assert vm.state == "error"
        assert vm.state_reason.startswith("restart limit reached (3 restarts)")
        assert "during boot" in vm.state_reason
        assert vm.restart.count == 3 and vm.restart.next_retry_at is None
        # the gaps between boots grow
        moves = [
            (e.data["from_state"], e.data["to_state"], at(e))
            for e in events_of(api, "doomed", "vm.state")
        ]
        assert [to for _, to, _ in moves] == [
            *["starting", "error", "stopped"] * 3,  # boot, crash, cleaned up by the restart
            "starting",
            "error",
            "error",  # the last boot's crash, then the same state restated as the limit
        ]
        assert len([to for _, to, _ in moves if to == "starting"]) == 4
        # A gap between two boots is the crashed boot's own length plus the backoff. Under TCG
        # a boot takes 2-3 s and varies by more than the backoff steps (0.5 s, then 1 s): two
        # runs here gave boot-to-boot gaps of 6.05, 2.45, 3.73 s and 2.19, 8.66, 1.86 s, so
        # they cannot show the growth. What the backoff alone decides is the time from a crash
        # (starting -> error) to the next boot (-> starting): the timer's delay, then the
        # restart's cleanup (error -> stopped), reservation and state write, a few SQLite
        # transactions (about 5 ms here: 0.504, 1.005, 2.005 s). So each is at least its delay
        # (less 20 ms: the timer sleeps on the monotonic clock, the log stamps wall-clock
        # time) and less than delay + 0.4 s. 0.4 s leaves the loaded 2-core machine room, and
        # stays below the smallest step (0.5 s): a constant (0.5, 0.5, 0.5 or 1, 1, 1),
        # shrinking, or differently growing backoff (0.5, 1.5, 4.5) misses a window.
        crashes = [when for came, to, when in moves if (came, to) == ("starting", "error")]
        boots = [when for _, to, when in moves if to == "starting"]
        assert len(crashes) == 4
        # crash i (of boot i) and boot i + 1; the fourth crash has no next boot
        waited = [(b - c).total_seconds() for c, b in zip(crashes[:3], boots[1:], strict=True)]
        for delay, gap in zip([0.5, 1.0, 2.0], waited, strict=True):
            assert delay - 0.02 <= gap < delay + 0.4, f"crash to next boot: {waited}"


def test_boot_watchdog_moves_a_vm_that_never_gets_ready_to_error(guest: GuestImage) -> None:
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
            assert vm.state == "error"
            assert vm.state_reason.startswith("watchdog: starting for")
            assert "limit 3 s" in vm.state_reason
            assert 3 <= took < 10
            assert vm.process is None
            assert events_of(api, "mute", "vm.watchdog")
    finally:
        proc.cleanup()
