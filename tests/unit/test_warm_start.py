"""Warm start decisions on the null hypervisor: when a start resumes the boot snapshot, and
every reason it boots cold instead (tests/integration/test_warm_start.py does it with QEMU).

The real lifecycle, SQLite store and event bus; the fake VMM "saves" a few bytes of state.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from stoker.domain.bootkey import boot_inputs, changed
from stoker.domain.events import EventType
from stoker.domain.spec import VMSpec
from stoker.domain.states import VMState
from stoker.domain.vm import VM
from stoker.drivers.base import DriverError
from stoker.services.directory import VMDirectory
from stoker.services.errors import InvalidSpec
from stoker.services.events import EventBus
from stoker.services.lifecycle import Lifecycle
from stoker.services.warmstart import WarmStartConfig, WarmStarts
from stoker.store.db import Database
from stoker.store.events import EventStore
from stoker.store.vms import VMStore
from tests.fakes import FakeDriver


def spec(kernel: Path, **fields: Any) -> VMSpec:
    return VMSpec.model_validate({"name": "web", "kernel": str(kernel), **fields})


def test_the_boot_key_changes_with_every_boot_input_and_names_it(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    base = spec(kernel, warm_start=True)
    contents = {str(kernel): "k1"}

    def key(s: VMSpec, **over: Any) -> Any:
        args: dict[str, Any] = {"contents": contents, "mac": None, "hypervisor_version": "7.2"}
        return boot_inputs(s, **{**args, **over})

    first = key(base)
    assert key(base).key == first.key, "the same inputs, the same key"
    variants = {
        "memory_mib": key(base.model_copy(update={"memory_mib": 512})),
        "vcpus": key(base.model_copy(update={"vcpus": 2})),
        "cmdline": key(base.model_copy(update={"cmdline": "console=ttyS0 quiet"})),
        "kernel": key(base, contents={str(kernel): "k2"}),
        "hypervisor": key(base, hypervisor_version="8.0"),
        "network": key(base, mac="52:54:00:00:00:01"),
    }
    for name, other in variants.items():
        assert other.key != first.key, name
        assert changed(first.fields, other.fields) == [name]


@dataclass
class World:
    lifecycle: Lifecycle
    warm: WarmStarts
    driver: FakeDriver
    events: EventBus
    kernel: Path

    def messages(self, kind: EventType) -> list[str]:
        return [e.message for e in self.events.store.query(type=kind, limit=100)]


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    db = Database(tmp_path / "stoker.db")
    events = EventBus(EventStore(db))
    directory = VMDirectory(VMStore(db), tmp_path)
    driver = FakeDriver()
    warm = WarmStarts(directory, events, WarmStartConfig(), lambda s: "fake 1")
    lifecycle = Lifecycle(
        directory,
        events,
        {"qemu": driver},
        create_checks=[warm],
        ready_observers=[warm],
        warm=warm,
    )
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel")
    yield World(lifecycle, warm, driver, events, kernel)
    await lifecycle.shutdown()
    await events.drain()
    db.close()


async def cycle(world: World, vm: VM) -> VM:
    """Stop (forced) if running, then start and wait until it settles and, on a cold boot,
    until its boot snapshot is taken (the lifecycle takes it just after ``running``)."""
    if world.lifecycle.get(vm.id).state == VMState.RUNNING:
        await world.lifecycle.stop(vm.id, graceful=False)
    restores = len(world.driver.restored_from)
    await world.lifecycle.start(vm.id)
    settled = await world.lifecycle.wait_settled(vm.id, 5)
    if len(world.driver.restored_from) == restores and world.warm.enabled(settled.spec):
        for _ in range(100):
            if "resume" in world.driver.last.calls and world.warm.current(vm.id) is not None:
                break
            await asyncio.sleep(0.01)
    return settled


async def test_the_first_boot_is_cold_and_saved_every_later_start_resumes(world: World) -> None:
    vm = await world.lifecycle.create(spec(world.kernel, warm_start=True))
    first = await cycle(world, vm)
    assert first.state == VMState.RUNNING and world.driver.restored_from == []
    assert world.driver.last.calls.count("save_state") == 1
    assert world.driver.last.calls[-2:] == ["save_state", "resume"]
    saved = world.warm.current(vm.id)
    assert saved is not None and saved.size_bytes == len(b"fake memory state")

    again = await cycle(world, vm)
    assert again.state == VMState.RUNNING
    assert world.driver.restored_from == [saved.state]
    assert "sync_guest_clock" in world.driver.last.calls, "a resumed guest is told the time"
    assert "save_state" not in world.driver.last.calls, "nothing changed: no new snapshot"
    assert len(world.messages(EventType.VM_WARM_START)) == 1


async def test_without_warm_start_nothing_is_saved(world: World) -> None:
    vm = await world.lifecycle.create(spec(world.kernel))
    await cycle(world, vm)
    await cycle(world, vm)
    assert world.driver.restored_from == [] and world.warm.current(vm.id) is None


async def test_a_changed_kernel_a_damaged_state_or_a_failed_resume_boot_cold(
    world: World,
) -> None:
    vm = await world.lifecycle.create(spec(world.kernel, warm_start=True))
    await cycle(world, vm)
    world.kernel.write_bytes(b"another kernel")
    assert (await cycle(world, vm)).state == VMState.RUNNING
    assert world.driver.restored_from == []
    assert any("(kernel)" in m for m in world.messages(EventType.VM_BOOT_SNAPSHOT_DISCARDED))

    saved = world.warm.current(vm.id)
    assert saved is not None, "the cold boot saved a new one"
    saved.state.write_bytes(b"fake memory stat!")
    assert (await cycle(world, vm)).state == VMState.RUNNING
    # the hypervisor loaded it while its checksum was read; it never ran, the start booted
    loaded = world.driver.vmms[-2]
    assert world.driver.restored_from == [saved.state] and "resume" not in loaded.calls
    assert loaded.calls[-2:] == ["kill", "close"]
    assert any("checksum" in m for m in world.messages(EventType.VM_BOOT_SNAPSHOT_DISCARDED))
    world.driver.restored_from.clear()

    async def refuse(*args: Any) -> Any:
        raise DriverError("incoming migration failed: version mismatch")

    world.driver.restore = refuse  # type: ignore[method-assign]
    vm_now = await cycle(world, vm)
    assert vm_now.state == VMState.RUNNING, "a failed resume is a cold boot, not an error"
    assert any(
        "warm start failed (incoming migration failed" in m
        for m in world.messages(EventType.VM_BOOT_SNAPSHOT_DISCARDED)
    )


async def test_a_writable_drive_is_refused_naming_the_field(world: World) -> None:
    disk = world.kernel.with_name("disk.img")
    disk.write_bytes(bytes(4096))
    with pytest.raises(InvalidSpec) as info:
        await world.lifecycle.create(
            spec(world.kernel, warm_start=True, drives=[{"path": str(disk)}])
        )
    assert [e["field"] for e in info.value.members["errors"]] == ["drives[0].read_only"]


async def test_a_half_written_snapshot_is_removed_and_its_paused_guest_resumed(
    world: World,
) -> None:
    vm = await world.lifecycle.create(spec(world.kernel, warm_start=True))
    await cycle(world, vm)
    root = world.lifecycle.paths(vm.id).root
    (root / "warm.tmp").mkdir()
    (root / "warm.tmp" / "state").write_bytes(b"half")
    world.warm.cleanup_leftovers()
    assert not (root / "warm.tmp").exists() and world.warm.current(vm.id) is not None
    vmm = world.driver.last
    vmm.running = False  # the crash left it paused
    await world.warm.vmm_up(world.lifecycle.get(vm.id), vmm)
    assert vmm.running and vmm.calls[-1] == "resume"
