"""Issue 13, finding 2: deleting a VM never silently destroys its snapshots; a snapshot being
taken and the VM's deletion exclude each other; kept snapshots restore into a new VM; a
restore never writes through a symlink or into a directory others can write to.

Real files and a real database; the VMs are stopped (their snapshots are disks only) or run
on the null hypervisor.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from stoker.domain.spec import VMSpec
from stoker.domain.states import VMState
from stoker.domain.vm import VM
from stoker.services.directory import VMDirectory
from stoker.services.errors import Conflict, NotFound
from stoker.services.events import EventBus
from stoker.services.lifecycle import Lifecycle
from stoker.services.snapshots import SnapshotHousekeeping, SnapshotsConfig, SnapshotService
from stoker.services.snapshots import create as create_module
from stoker.services.snapshots.layout import KEPT_DIR
from stoker.store.db import Database
from stoker.store.events import EventStore
from stoker.store.snapshots import SnapshotStore
from stoker.store.vms import VMStore
from tests.fakes import FakeDriver

T0 = datetime(2026, 11, 21, 6, 30, tzinfo=UTC)


class World:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.db = Database(root / "stoker.db")
        self.events = EventBus(EventStore(self.db))
        directory = VMDirectory(VMStore(self.db), root)
        self.store = SnapshotStore(self.db)
        self.housekeeping = SnapshotHousekeeping(directory, self.store, self.events)
        self.driver = FakeDriver()
        self.lifecycle = Lifecycle(
            directory, self.events, {"qemu": self.driver}, vm_snapshots=self.housekeeping
        )
        self.snapshots = SnapshotService(
            self.lifecycle,
            self.store,
            SnapshotsConfig(margin_mib=0),
            locks=self.housekeeping.locks,
        )
        self.pool = root / "pool"
        self.pool.mkdir(mode=0o700)

    def add_vm(self, name: str, state: VMState = VMState.STOPPED) -> VM:
        disk = self.pool / f"{name}.raw"
        disk.write_bytes(name.encode() * 4096)
        spec = VMSpec(name=name, kernel="/k", drives=[{"path": str(disk)}])
        vm = VM(f"{name:0<16}"[:16], name, spec, state, "made", T0, T0)
        self.lifecycle.vms.insert(vm)
        return vm

    def types(self) -> list[str]:
        return [r["type"] for r in self.db.query("SELECT type FROM events ORDER BY id")]


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


async def test_delete_of_a_vm_with_snapshots_asks_what_to_do(world: World) -> None:
    world.add_vm("web")
    first = await world.snapshots.create("web")
    await world.snapshots.create("web")
    with pytest.raises(Conflict, match=r"web has 2 snapshots .*--snapshots keep") as refused:
        await world.lifecycle.delete("web")
    assert refused.value.members["snapshots"] == 2
    assert world.lifecycle.directory.find("web") is not None  # nothing happened
    assert Path(first.path).is_dir()


async def test_delete_with_snapshots_delete_removes_each_with_an_event(world: World) -> None:
    vm = world.add_vm("web")
    snaps = [await world.snapshots.create("web") for _ in range(2)]
    await world.lifecycle.delete("web", snapshots="delete")
    assert world.store.all() == []
    assert not any(Path(s.path).exists() for s in snaps)
    assert world.types().count("snapshot.deleted") == 2
    assert not (world.root / "vms" / vm.id).exists()


async def test_protected_snapshots_are_never_deleted_with_their_vm(world: World) -> None:
    world.add_vm("web")
    await world.snapshots.create("web")
    kept = await world.snapshots.create("web", kind="pre-update")
    with pytest.raises(Conflict, match=rf"1 protected snapshot \({kept.id}\)"):
        await world.lifecycle.delete("web", snapshots="delete", force=True)
    assert len(world.store.all()) == 2 and Path(kept.path).is_dir()


async def test_kept_snapshots_stay_listed_and_restore_into_a_new_vm(world: World) -> None:
    vm = world.add_vm("web")
    snap = await world.snapshots.create("web", kind="pre-update")
    await world.lifecycle.delete("web", snapshots="keep")
    assert world.lifecycle.directory.find("web") is None
    kept = world.snapshots.get(snap.id)
    assert Path(kept.path) == world.root / KEPT_DIR / snap.id and Path(kept.path).is_dir()
    assert [s.id for s in world.snapshots.all("web")] == [snap.id]  # by the old name
    assert [s.id for s in world.snapshots.all(vm.id)] == [snap.id]  # or id
    assert "snapshot.kept" in world.types()
    # its VM is gone: the in-place restore says how to restore it
    with pytest.raises(Conflict, match="--as NEWNAME"):
        await world.snapshots.restore(snap.id)
    # kept snapshots survive the start-up cleanup, with or without their row
    world.housekeeping.cleanup_leftovers()
    assert world.snapshots.get(snap.id).path == kept.path
    world.store.delete(snap.id)
    world.housekeeping.cleanup_leftovers()
    assert world.snapshots.get(snap.id).vm_name == "web"

    _, new_vm = await world.snapshots.restore(snap.id, as_name="web2")
    assert new_vm.name == "web2" and new_vm.state == VMState.PENDING  # disks only: not started
    disk = Path(new_vm.spec.drives[0].path)
    assert disk == world.pool / "web2-vd0.raw"
    assert disk.read_bytes() == b"web" * 4096
    assert disk.stat().st_mode & 0o777 == 0o600
    with pytest.raises(Conflict, match="already exists"):
        await world.snapshots.restore(snap.id, as_name="web2")


async def test_restore_as_with_memory_resumes_the_new_vm(world: World) -> None:
    world.add_vm("web", state=VMState.PENDING)
    await world.lifecycle.start("web")
    await world.lifecycle.wait_settled(world.lifecycle.get("web").id, 5)
    snap = await world.snapshots.create("web")
    assert snap.with_memory
    await world.lifecycle.delete("web", force=True, snapshots="keep")
    _, vm = await world.snapshots.restore(snap.id, as_name="again")
    assert vm.state == VMState.RUNNING
    assert world.driver.restored_from[-1].name == "memory"


async def test_a_snapshot_being_taken_and_the_vms_deletion_exclude_each_other(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # was: the snapshot said "created", the VM's directory (and the snapshot) went with the
    # deletion, and an orphan directory survived restarts
    vm = world.add_vm("web")
    copying = asyncio.Event()
    real_copy = create_module.copy_disks

    def slow_copy(spec: VMSpec, tmp: Path) -> None:
        asyncio.run_coroutine_threadsafe(_set(copying), loop)
        real_copy(spec, tmp)
        import time

        time.sleep(0.3)

    async def _set(event: asyncio.Event) -> None:
        event.set()

    loop = asyncio.get_running_loop()
    monkeypatch.setattr(create_module, "copy_disks", slow_copy)
    taking = asyncio.create_task(world.snapshots.create("web"))
    await copying.wait()
    deleting = asyncio.create_task(world.lifecycle.delete("web"))
    snap = await taking
    with pytest.raises(Conflict, match="1 snapshot"):
        await deleting  # it waited for the snapshot, and counted it
    assert Path(snap.path).is_dir()
    await world.lifecycle.delete("web", snapshots="delete")
    assert not (world.root / "vms" / vm.id).exists() and world.store.all() == []
    # and the other order: a snapshot asked for while the VM is being deleted finds it gone
    world.add_vm("db")
    deleting = asyncio.create_task(world.lifecycle.delete("db"))
    await asyncio.sleep(0)
    with pytest.raises(NotFound):
        await world.snapshots.create("db")
    await deleting
    assert not list((world.root / "vms").iterdir())


async def test_restore_never_writes_through_a_symlink(world: World) -> None:
    vm = world.add_vm("web")
    snap = await world.snapshots.create("web")
    victim = world.root / "victim"
    victim.write_text("precious")
    disk = Path(vm.spec.drives[0].path)
    # a link planted at the name a restore writes its temporary copy to
    planted = disk.with_name(f".{disk.name}.stoker-restore-{snap.id}")
    planted.symlink_to(victim)
    # and the disk itself replaced by a link
    disk.unlink()
    disk.symlink_to(victim)
    await world.snapshots.restore(snap.id)
    assert victim.read_text() == "precious"
    assert not disk.is_symlink() and disk.read_bytes() == b"web" * 4096


async def test_restore_refuses_a_directory_others_can_write(world: World) -> None:
    world.add_vm("web")
    snap = await world.snapshots.create("web")
    os.chmod(world.pool, 0o777)
    with pytest.raises(Conflict, match="can be written by other users"):
        await world.snapshots.restore(snap.id)
    with pytest.raises(Conflict, match="can be written by other users"):
        await world.snapshots.restore(snap.id, as_name="web2")
    assert world.lifecycle.directory.find("web2") is None
    assert sorted(p.name for p in world.pool.iterdir()) == ["web.raw"]


async def test_cleanup_keeps_the_snapshots_of_a_vm_directory_without_a_vm(world: World) -> None:
    vm = world.add_vm("web")
    snap = await world.snapshots.create("web")
    # the VM's row is gone (a database restored from an older backup) but its files are not
    with world.db.write() as conn:
        conn.execute("DELETE FROM vms WHERE id = ?", (vm.id,))
        conn.execute("DELETE FROM snapshots")
    (world.root / "vms" / vm.id / "console.log").write_text("boot")
    world.housekeeping.cleanup_leftovers()
    assert not (world.root / "vms" / vm.id).exists()
    kept = world.snapshots.get(snap.id)
    assert Path(kept.path) == world.root / KEPT_DIR / snap.id and kept.vm_name == "web"


async def test_a_kept_snapshot_moved_before_its_row_is_found_again(world: World) -> None:
    world.add_vm("web")
    snap = await world.snapshots.create("web")
    (world.root / KEPT_DIR).mkdir()
    shutil.move(snap.path, world.root / KEPT_DIR / snap.id)  # the agent died before the row
    world.housekeeping.cleanup_leftovers()
    assert world.snapshots.get(snap.id).path == str(world.root / KEPT_DIR / snap.id)
    assert "snapshot.lost" not in world.types()
