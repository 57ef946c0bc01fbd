"""The restart policy as an event listener, persisted retries, give-up, watchdogs, and the
health service's verdicts; with a fake lifecycle over a real store and event bus."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from stoker.domain.events import EventType
from stoker.domain.spec import VMSpec
from stoker.domain.states import VMState
from stoker.domain.vm import VM
from stoker.drivers.base import ProcessRecord
from stoker.services.directory import VMDirectory
from stoker.services.events import EventBus
from stoker.services.health import HealthConfig, HealthService
from stoker.services.recovery import Recovery, WatchdogConfig
from stoker.store.db import Database
from stoker.store.events import EventStore
from stoker.store.health import HealthStore
from stoker.store.vms import VMStore
from tests.fakes import FakeVMM

S = VMState


class FakeLifecycle:
    """Just enough lifecycle: state changes through the real store and bus; actions recorded."""

    def __init__(self, vms: VMStore, events: EventBus) -> None:
        self.vms, self.events = vms, events
        self.calls: list[tuple] = []

    async def set_state(self, vm_id: str, to: VMState, reason: str) -> VM:
        vm = self.vms.get(vm_id)
        assert vm is not None
        assert self.vms.compare_and_set_state(vm_id, vm.state, to, reason, datetime.now(UTC))
        self.events.publish(
            EventType.VM_STATE,
            reason,
            vm_id,
            from_state=vm.state.value,
            to_state=to.value,
            reason=reason,
        )
        return self.vms.get(vm_id)  # type: ignore[return-value]

    async def restart(self, ref: str, graceful: bool = True, reason: str = "") -> VM:
        self.calls.append(("restart", ref, graceful, reason))
        await self.set_state(ref, S.STOPPED, "cleaned up after error")
        await self.set_state(ref, S.STARTING, reason)
        return await self.set_state(ref, S.RUNNING, "guest ready")

    async def abort(self, ref: str, reason: str) -> VM:
        self.calls.append(("abort", ref, reason))
        return await self.set_state(ref, S.ERROR, reason)

    async def stop(self, ref: str, graceful: bool = True, reason: str = "", **kw) -> VM:
        self.calls.append(("stop", ref, graceful))
        return await self.set_state(ref, S.STOPPED, "forced stop: VMM killed")


@pytest.fixture
def world(tmp_path):
    db = Database(tmp_path / "s.db")
    events = EventBus(EventStore(db))
    vms = VMStore(db)
    lifecycle = FakeLifecycle(vms, events)
    yield db, events, vms, lifecycle
    db.close()


def make_vm(vms: VMStore, name: str = "web", state=S.RUNNING, since=None, **spec) -> VM:
    body = {"name": name, "kernel": "/k", **spec}
    now = since or datetime.now(UTC)
    vm = VM(
        id=f"{name:0<16}"[:16],
        name=name,
        spec=VMSpec.model_validate(body),
        state=state,
        state_reason="test",
        state_since=now,
        created_at=now,
    )
    vms.insert(vm)
    return vm


def types(events: EventBus, vm_id: str) -> list[str]:
    return [e.type for e in events.store.query(vm_id=vm_id, limit=1000)]


def listening_recovery(world) -> Recovery:
    """A Recovery over the world's fake lifecycle, told of every event (as the agent wires it)."""
    _, events, _, lifecycle = world
    recovery = Recovery(lifecycle, events, WatchdogConfig())  # type: ignore[arg-type]
    events.add_listener(recovery.on_event)
    return recovery


async def settle(recovery: Recovery, seconds: float = 0.05) -> None:
    await asyncio.sleep(seconds)
    await recovery.drain()


async def test_error_under_on_failure_schedules_a_persisted_retry_then_restarts(world):
    _, events, vms, lifecycle = world
    recovery = listening_recovery(world)
    vm = make_vm(vms, restart={"policy": "on-failure", "backoff_initial_s": 0.2})
    await lifecycle.set_state(vm.id, S.ERROR, "VMM killed by SIGKILL")
    await settle(recovery)
    pending = vms.get(vm.id)
    assert pending.next_retry_at is not None and pending.restart_count == 0
    assert lifecycle.calls == []  # not before its time
    await asyncio.sleep(0.3)
    await recovery.drain()
    assert lifecycle.calls == [("restart", vm.id, False, "auto-restart 1 of 5 after error")]
    done = vms.get(vm.id)
    assert done.state == S.RUNNING and done.restart_count == 1
    assert done.next_retry_at is None and done.last_restart_at is not None
    assert "vm.restart_scheduled" in types(events, vm.id)
    assert "vm.auto_restart" in types(events, vm.id)
    await recovery.stop()


async def test_policy_never_and_operator_stops_do_nothing(world):
    _, _, vms, lifecycle = world
    recovery = listening_recovery(world)
    vm = make_vm(vms)  # policy never
    await lifecycle.set_state(vm.id, S.ERROR, "VMM exited with code 1")
    other = make_vm(vms, "cron", restart={"policy": "always"})
    await lifecycle.set_state(other.id, S.STOPPING, "graceful stop requested")
    await lifecycle.set_state(other.id, S.STOPPED, "guest shut down gracefully")
    await settle(recovery)
    assert lifecycle.calls == []
    assert vms.get(vm.id).next_retry_at is None


async def test_always_restarts_after_a_guest_power_off_but_on_failure_does_not(world):
    _, _, vms, lifecycle = world
    recovery = listening_recovery(world)
    always = make_vm(vms, "a", restart={"policy": "always", "backoff_initial_s": 0.01})
    failing = make_vm(vms, "b", restart={"policy": "on-failure", "backoff_initial_s": 0.01})
    await lifecycle.set_state(always.id, S.STOPPED, "guest powered off")
    await lifecycle.set_state(failing.id, S.STOPPED, "guest powered off")
    await settle(recovery, 0.1)
    assert [c[1] for c in lifecycle.calls] == [always.id]


async def test_limit_reached_restates_the_error_and_tells(world):
    _, events, vms, lifecycle = world
    recovery = listening_recovery(world)
    vm = make_vm(vms, restart={"policy": "on-failure", "max_retries": 2})
    vms.set_restart_info(vm.id, 2, datetime.now(UTC), None)
    await lifecycle.set_state(vm.id, S.ERROR, "VMM exited with code 1 during boot")
    await settle(recovery)
    after = vms.get(vm.id)
    assert after.state == S.ERROR
    assert after.state_reason == (
        "restart limit reached (2 restarts): VMM exited with code 1 during boot"
    )
    assert "vm.restart_limit_reached" in types(events, vm.id)
    assert lifecycle.calls == []


async def test_unhealthy_running_vm_is_restarted_without_a_graceful_stop(world):
    _, events, vms, lifecycle = world
    recovery = listening_recovery(world)
    vm = make_vm(vms, restart={"policy": "on-failure", "backoff_initial_s": 0.01})
    lifecycle.restart = _running_restart(lifecycle)  # type: ignore[method-assign]
    # what the health service publishes when a running VM turns unhealthy
    events.publish(
        EventType.VM_HEALTH,
        "web: healthy -> unhealthy",
        vm.id,
        to_health="unhealthy",
        reason="probe vmm failed 3 times",
    )
    await settle(recovery, 0.1)
    assert lifecycle.calls == [("restart", vm.id, False, "auto-restart 1 of 5 after unhealthy")]


def _running_restart(lifecycle: FakeLifecycle):
    async def restart(ref: str, graceful: bool = True, reason: str = "") -> VM:
        lifecycle.calls.append(("restart", ref, graceful, reason))
        await lifecycle.set_state(ref, S.RESTARTING, reason)
        return await lifecycle.set_state(ref, S.RUNNING, "restarted")

    return restart


async def test_a_retry_persisted_by_a_previous_agent_is_rearmed_at_start(world):
    _, events, vms, lifecycle = world
    vm = make_vm(vms, state=S.ERROR, restart={"policy": "on-failure"})
    vms.set_restart_info(vm.id, 1, None, datetime.now(UTC) - timedelta(seconds=1))
    recovery = listening_recovery(world)
    await recovery.start()
    await settle(recovery, 0.1)
    assert lifecycle.calls == [("restart", vm.id, False, "auto-restart 2 of 5 after a failure")]
    assert vms.get(vm.id).restart_count == 2
    assert "vm.restart_rearmed" in types(events, vm.id)
    await recovery.stop()


async def test_an_operator_start_cancels_a_pending_retry_and_resets_the_count(world):
    _, events, vms, lifecycle = world
    recovery = listening_recovery(world)
    vm = make_vm(vms, restart={"policy": "on-failure", "backoff_initial_s": 5})
    vms.set_restart_info(vm.id, 3, None, None)
    await lifecycle.set_state(vm.id, S.ERROR, "VMM killed by SIGKILL")
    await settle(recovery)
    assert vms.get(vm.id).next_retry_at is not None
    await lifecycle.set_state(vm.id, S.STOPPED, "cleaned up after error")
    await lifecycle.set_state(vm.id, S.STARTING, "start requested")
    await settle(recovery)
    after = vms.get(vm.id)
    assert after.next_retry_at is None and after.restart_count == 0
    assert "vm.restart_cancelled" in types(events, vm.id)
    await recovery.stop()


async def test_watchdogs_bound_each_transient_state(world):
    _, events, vms, lifecycle = world
    config = WatchdogConfig(
        starting_timeout_s=10, stopping_timeout_s=20, restarting_timeout_s=30, watchdog_grace_s=1
    )
    recovery = Recovery(lifecycle, events, config)  # type: ignore[arg-type]
    old = datetime.now(UTC) - timedelta(seconds=40)
    fresh = datetime.now(UTC)
    stuck_start = make_vm(vms, "s1", state=S.STARTING, since=old, boot_timeout_s=60)
    own_timeout = make_vm(
        vms,
        "s2",
        state=S.STARTING,
        since=datetime.now(UTC) - timedelta(seconds=5.5),
        boot_timeout_s=5,
    )
    young = make_vm(vms, "s3", state=S.STARTING, since=fresh)
    stuck_stop = make_vm(vms, "s4", state=S.STOPPING, since=old, stop_timeout_s=10)
    stuck_restart = make_vm(vms, "s5", state=S.RESTARTING, since=old)
    await recovery.check_watchdogs()
    acted = {c[1]: c for c in lifecycle.calls}
    assert acted[stuck_start.id][0] == "abort"
    assert acted[stuck_start.id][2] == "watchdog: starting for 40 s (limit 10 s)"
    assert own_timeout.id not in acted  # its own 5 s boot timeout + 1 s grace: the lifecycle's
    assert young.id not in acted
    assert acted[stuck_stop.id] == ("stop", stuck_stop.id, False)
    assert acted[stuck_restart.id][0] == "abort"
    assert "limit 30 s" in acted[stuck_restart.id][2]
    before = len(lifecycle.calls)
    await recovery.check_watchdogs()
    assert len(lifecycle.calls) == before  # each state entry is acted on once


async def test_health_service_probes_verdicts_and_unhealthy_event(world, tmp_path):
    db, events, vms, lifecycle = world
    directory = VMDirectory(vms, tmp_path)
    health = HealthService(
        directory,
        events,
        HealthStore(db),
        HealthConfig(vmm_interval_s=0.02, vmm_timeout_s=0.05),
    )
    events.add_listener(health.on_event)
    vm = make_vm(vms)
    vmm = FakeVMM(vm.spec, ProcessRecord(4242, 1, "/x"))
    directory.own(vm.id, vmm)
    await health.vmm_up(vm, vmm)
    await asyncio.sleep(0.1)
    assert (await health.report(vm)).health == "healthy"
    vmm.status_error = "QMP query-status did not answer within 0.05 s"
    await asyncio.sleep(0.2)
    report = await health.report(vm)
    assert report.health == "unhealthy"
    probe = report.probes[0].state
    assert probe.name == "vmm" and probe.status == "unhealthy"
    assert report.consecutive_failures >= 3
    assert "did not answer" in (report.last_error or "")
    # recovery hears of it through the event, with the reason
    told = [
        e.data["reason"]
        for e in events.store.query(type="vm.health")
        if e.data["to_health"] == "unhealthy"
    ]
    assert told and told[0].startswith("probe vmm failed 3 times")
    healths = [e.data["to_health"] for e in events.store.query(type="vm.health")]
    assert healths == ["healthy", "unhealthy"]
    # leaving running stops the probes and the verdict becomes unknown
    await lifecycle.set_state(vm.id, S.ERROR, "VMM killed by SIGKILL")
    checks = probe.checks
    await asyncio.sleep(0.1)
    report = await health.report(replace(vm, state=S.ERROR))
    assert report.health == "unknown" and report.probes[0].state.checks == checks
    await health.stop()
