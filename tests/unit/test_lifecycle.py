"""The real lifecycle, recovery and quota services on the null hypervisor (tests/fakes.py).

Everything but the hypervisor is real: the SQLite store, the event bus, the state table, the
restart policy. What each test scripts on the fake VMM (boot failure, crash, guest power-off,
a guest that ignores ACPI) is what a real QEMU does in tests/integration; here the decisions
are checked in milliseconds and without a process.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from stoker.domain.capabilities import Capabilities
from stoker.domain.events import EventType
from stoker.domain.spec import VMSpec
from stoker.domain.states import IllegalAction, VMState
from stoker.domain.vm import VM
from stoker.drivers.base import IOLimits
from stoker.services.directory import VMDirectory
from stoker.services.errors import Conflict, StartVeto
from stoker.services.events import EventBus
from stoker.services.lifecycle import Lifecycle
from stoker.services.quotas import QuotasConfig, QuotaService, VMCgroups
from stoker.services.recovery import Recovery, WatchdogConfig
from stoker.store.db import Database
from stoker.store.events import EventStore
from stoker.store.quotas import QuotaStore
from stoker.store.vms import VMStore
from tests.fakes import FIRECRACKER_LIKE, FakeDriver

S = VMState


class Recorder:
    """Stands in for the capabilities the lifecycle calls back, and records the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.veto: str | None = None

    async def before_start(self, vm: VM) -> None:
        self.calls.append(("before_start", vm.name))
        if self.veto is not None:
            raise StartVeto(self.veto)

    async def vmm_spawned(self, vm: VM, pid: int) -> None:
        self.calls.append(("vmm_spawned", vm.name))

    async def vmm_up(self, vm: VM, vmm: Any) -> None:
        self.calls.append(("vmm_up", vm.name))


@dataclass
class World:
    db: Database
    events: EventBus
    directory: VMDirectory
    driver: FakeDriver
    lifecycle: Lifecycle
    recorder: Recorder
    kernel: Path

    def spec(self, name: str = "web", **fields: Any) -> VMSpec:
        return VMSpec.model_validate(
            {"name": name, "kernel": str(self.kernel), "stop_timeout_s": 0.2, **fields}
        )

    def states(self, vm_id: str) -> list[str]:
        """The VM's transitions, oldest first, as ``from>to``."""
        return [
            f"{e.data['from_state']}>{e.data['to_state']}"
            for e in self.events.store.query(vm_id=vm_id, type=EventType.VM_STATE, limit=1000)
        ]

    def reasons(self, vm_id: str) -> list[str]:
        return [
            str(e.data["reason"])
            for e in self.events.store.query(vm_id=vm_id, type=EventType.VM_STATE, limit=1000)
        ]


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    db = Database(tmp_path / "stoker.db")
    events = EventBus(EventStore(db))
    directory = VMDirectory(VMStore(db), tmp_path)
    driver = FakeDriver(script={"ready_after_s": 0.01})
    recorder = Recorder()
    lifecycle = Lifecycle(
        directory,
        events,
        {"qemu": driver},
        start_guards=[recorder],
        spawn_observers=[recorder],
        vmm_observers=[recorder],
    )
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel")
    yield World(db, events, directory, driver, lifecycle, recorder, kernel)
    await lifecycle.shutdown()
    await events.drain()
    db.close()


async def running(world: World, name: str = "web", **fields: Any) -> VM:
    vm = await world.lifecycle.create(world.spec(name, **fields))
    await world.lifecycle.start(vm.id)
    return await world.lifecycle.wait_settled(vm.id, 5)


async def test_start_runs_the_guard_spawn_and_up_observers_in_order(world: World) -> None:
    vm = await running(world)
    assert vm.state == S.RUNNING and vm.state_reason == "guest ready"
    assert world.states(vm.id) == ["pending>starting", "starting>running"]
    assert world.recorder.calls == [
        ("before_start", "web"),
        ("vmm_spawned", "web"),
        ("vmm_up", "web"),
    ]
    assert vm.process is not None and vm.process.pid == world.driver.last.record.pid


async def test_a_vetoed_start_is_409_and_spawns_nothing(world: World) -> None:
    world.recorder.veto = "hook web-policy refused: exit code 1"
    vm = await world.lifecycle.create(world.spec())
    with pytest.raises(Conflict, match="vetoed by a pre-start hook: hook web-policy refused"):
        await world.lifecycle.start(vm.id)
    assert world.driver.vmms == []
    assert world.lifecycle.get(vm.id).state == S.PENDING


async def test_boot_failure_and_spawn_failure_are_errors_with_the_reason(world: World) -> None:
    world.driver.script = {"boot_error": "boot timeout: no ready marker within 1 s"}
    vm = await running(world)
    assert vm.state == S.ERROR
    assert vm.state_reason == "boot timeout: no ready marker within 1 s"
    assert "kill" in world.driver.last.calls  # a VMM that failed its boot is not left behind
    world.driver.spawn_error = "cannot start qemu-system-x86_64: no such file"
    other = await running(world, "db")
    assert other.state == S.ERROR
    assert (
        other.state_reason == "VMM failed to start: cannot start qemu-system-x86_64: no such file"
    )


async def test_a_crash_is_an_error_and_a_guest_power_off_is_a_stop(world: World) -> None:
    vm = await running(world)
    world.driver.last.crash(sig=9)
    await asyncio.sleep(0.05)
    crashed = world.lifecycle.get(vm.id)
    assert crashed.state == S.ERROR and crashed.state_reason == "VMM killed by SIGKILL"
    other = await running(world, "db")
    world.driver.last.guest_poweroff()
    await asyncio.sleep(0.05)
    off = world.lifecycle.get(other.id)
    assert off.state == S.STOPPED and off.state_reason == "guest powered off"


async def test_graceful_stop_then_forced_when_the_guest_ignores_acpi(world: World) -> None:
    vm = await running(world)
    stopped = await world.lifecycle.stop(vm.id)
    assert stopped.state == S.STOPPED
    assert stopped.state_reason == "guest shut down gracefully"
    world.driver.script = {"obeys_shutdown": False}
    other = await running(world, "db")
    stopped = await world.lifecycle.stop(other.id)
    assert stopped.state_reason == "graceful stop timed out after 0.2 s: VMM killed"
    await asyncio.sleep(0.01)  # its handle is closed once the stop is recorded
    assert world.driver.last.calls[-3:] == ["request_shutdown", "kill", "close"]


async def test_a_forced_stop_answers_and_tells_listeners_once_the_vmm_is_gone(
    world: World,
) -> None:
    """The kernel tears the VMM down while the stop is written down; nobody hears of it (a
    post-stop hook, the cgroup's removal) before the process is gone."""
    vm = await running(world)
    world.driver.last.dies_after_kill_s = 0.05
    heard: list[str] = []
    world.events.add_listener(
        lambda e: heard.append(e.data["to_state"]) if e.type == EventType.VM_STATE else None
    )
    stop = asyncio.create_task(world.lifecycle.stop(vm.id, graceful=False))
    await asyncio.sleep(0.02)
    assert not stop.done() and heard == []
    assert world.lifecycle.get(vm.id).state == S.STOPPED  # already on the disk
    stopped = await stop
    assert stopped.state_reason == "forced stop: VMM killed" and stopped.process is None
    assert heard == ["stopping", "stopped"]
    assert world.states(vm.id)[-2:] == ["running>stopping", "stopping>stopped"]


async def test_a_vmm_that_outlives_sigkill_is_reported(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("stoker.services.lifecycle.KILL_WAIT_S", 0.05)
    vm = await running(world)
    world.driver.last.dies_after_kill_s = None  # stuck in uninterruptible I/O
    stopped = await world.lifecycle.stop(vm.id, graceful=False)
    assert stopped.state == S.STOPPED
    (event,) = world.events.store.query(vm_id=vm.id, type=EventType.VM_WATCHDOG, limit=5)
    assert "still not gone 0.05 s after SIGKILL" in event.message


async def test_restart_gives_a_new_vmm(world: World) -> None:
    vm = await running(world)
    first = world.driver.last
    await world.lifecycle.restart(vm.id, graceful=False)
    again = await world.lifecycle.wait_settled(vm.id, 5)
    assert again.state == S.RUNNING and again.state_reason == "restarted"
    assert world.driver.last is not first and "kill" in first.calls
    assert world.states(vm.id)[-2:] == ["running>restarting", "restarting>running"]


async def test_illegal_actions_are_refused_by_the_table(world: World) -> None:
    vm = await world.lifecycle.create(world.spec())
    with pytest.raises(IllegalAction):
        await world.lifecycle.stop(vm.id)
    await running(world, "db")
    with pytest.raises(IllegalAction):
        await world.lifecycle.delete("db")


async def test_recovery_restarts_a_crashed_vm_with_backoff_then_gives_up(world: World) -> None:
    """on-failure, two retries: crash, restart; crash, restart; crash: limit reached."""
    recovery = Recovery(world.lifecycle, world.events, WatchdogConfig())
    world.events.add_listener(recovery.on_event)
    policy = {"policy": "on-failure", "max_retries": 2, "backoff_initial_s": 0.05}
    vm = await running(world, restart=policy)
    for attempt in (1, 2):
        world.driver.last.crash(sig=9)
        await asyncio.sleep(0.02)
        assert world.lifecycle.get(vm.id).state == S.ERROR
        for _ in range(100):  # the retry waits out its backoff, then boots a new fake VMM
            await asyncio.sleep(0.01)
            if world.lifecycle.get(vm.id).state == S.RUNNING:
                break
        now = world.lifecycle.get(vm.id)
        assert now.state == S.RUNNING and now.restart_count == attempt
    world.driver.last.crash(sig=9)
    await asyncio.sleep(0.1)
    await recovery.drain()
    final = world.lifecycle.get(vm.id)
    assert final.state == S.ERROR
    assert final.state_reason == "restart limit reached (2 restarts): VMM killed by SIGKILL"
    assert len(world.driver.vmms) == 3  # the first boot and two restarts, no more
    await recovery.stop()


async def test_quota_boot_limits_reach_a_vmm_that_takes_them_at_boot(tmp_path: Path) -> None:
    """A driver that can only take its limits in the boot configuration (Firecracker's rate
    limiters) gets the quota through BootOptions; one that cannot enforce a limit gets none."""
    db = Database(tmp_path / "stoker.db")
    events = EventBus(EventStore(db))
    directory = VMDirectory(VMStore(db), tmp_path)
    driver = FakeDriver(name="firecracker", capabilities=FIRECRACKER_LIKE)

    def capabilities_of(spec: VMSpec) -> Capabilities:
        return driver.capabilities

    cgroups = VMCgroups(tmp_path / "no-cgroups", "stoker")
    quotas = QuotaService(
        directory,
        events,
        QuotaStore(db),
        QuotasConfig(disk_iops=500, network_mbps=10),
        capabilities_of,
        cgroups=cgroups,
    )
    lifecycle = Lifecycle(directory, events, {"firecracker": driver}, boot_limits=quotas)
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF")
    spec = VMSpec.model_validate(
        {
            "name": "fc",
            "kernel": str(kernel),
            "hypervisor": "firecracker",
            "network": {"mode": "tap", "tap": "tap-fc"},
        }
    )
    vm = await lifecycle.create(spec)
    await lifecycle.start(vm.id)
    assert driver.boots[-1].io_limits == IOLimits(disk_iops=500, net_mbps=10)
    await lifecycle.shutdown()
    db.close()


async def test_a_stop_the_agent_died_in_finishes_even_when_re_adoption_breaks(
    world: World,
) -> None:
    """The agent died while stopping a VM; the next one cannot re-adopt its VMM (an
    unexpected error, not a DriverError): the stop is finished (VMM killed, stopped), not
    left in stopping nor turned into an error the table forbids."""
    import subprocess

    from stoker.domain.process import ProcessRecord
    from stoker.domain.states import VMState
    from stoker.host.proc import read_start_time

    vm = await running(world)
    await world.lifecycle.shutdown()  # the agent is gone; the VMM is left alone
    vmm_stand_in = subprocess.Popen(["sleep", "60"])
    try:
        start = read_start_time(vmm_stand_in.pid)
        assert start is not None
        world.lifecycle.vms.set_process(vm.id, ProcessRecord(vmm_stand_in.pid, start, "x"))
        assert world.lifecycle.vms.compare_and_set_state(
            vm.id, VMState.RUNNING, VMState.STOPPING, "stop requested", world.lifecycle.clock()
        )

        async def broken(*args: Any) -> Any:
            raise RuntimeError("unexpected")

        world.driver.adopt = broken  # type: ignore[method-assign]
        await world.lifecycle.recover()
        after = world.lifecycle.get(vm.id)
        assert after.state == S.STOPPED, after.state_reason
        assert "re-adoption failed: unexpected" in after.state_reason
        assert vmm_stand_in.wait(5) == -9, "the VMM it could not re-adopt is killed"
    finally:
        vmm_stand_in.kill()
        vmm_stand_in.wait()
