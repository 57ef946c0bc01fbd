"""The snapshot service on real files and a real database, with VMs that never run.

A stopped VM's snapshot is its disks only, so create, restore, prune, verify, the space
check and start-up cleanup run here without QEMU (the integration tests cover live VMs).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from stoker.domain.spec import VMSpec
from stoker.domain.states import VMState
from stoker.domain.vm import VM
from stoker.services.directory import VMDirectory
from stoker.services.errors import Conflict, InvalidSpec
from stoker.services.events import EventBus
from stoker.services.lifecycle import Lifecycle
from stoker.services.snapshots import (
    MANIFEST,
    GrowingFileHasher,
    InsufficientSpace,
    SnapshotHousekeeping,
    SnapshotsConfig,
    SnapshotService,
    hash_tree,
)
from stoker.store.db import Database
from stoker.store.events import EventStore
from stoker.store.snapshots import SnapshotStore
from stoker.store.vms import VMStore

T0 = datetime(2026, 11, 21, 6, 30, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def world(tmp_path: Path):
    db = Database(tmp_path / "s.db")
    events = EventBus(EventStore(db))
    lifecycle = Lifecycle(VMDirectory(VMStore(db), tmp_path), events, {})
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"A" * 65536)
    spec = VMSpec(name="web", kernel="/k", drives=[{"path": str(disk)}])
    vm = VM("a" * 16, "web", spec, VMState.STOPPED, "stopped", T0, T0)
    lifecycle.vms.insert(vm)
    clock = Clock()

    def make(**settings) -> SnapshotService:
        return SnapshotService(
            lifecycle, SnapshotStore(db), SnapshotsConfig(**{"margin_mib": 0, **settings}), clock
        )

    return make, lifecycle, disk, clock, db


def messages(db: Database) -> list[str]:
    return [r["message"] for r in db.query("SELECT message FROM events ORDER BY id")]


async def test_disk_snapshot_restore_and_manifest(world):
    make, lifecycle, disk, _clock, db = world
    svc = make(timezone="Europe/Berlin")
    snap = await svc.create("web", tags=("t1",))
    assert not snap.with_memory and snap.kind == "manual" and not snap.protected
    root = Path(snap.path)
    assert root.parent == lifecycle.paths(lifecycle.get("web").id).snapshots
    manifest = json.loads((root / MANIFEST).read_text())
    assert manifest["files"]["disks/vd0.raw"] == {
        "size": 65536,
        "sha256": hashlib.sha256(b"A" * 65536).hexdigest(),
    }
    assert manifest["created"] == T0.isoformat() and manifest["tags"] == ["t1"]
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]

    disk.write_bytes(b"B" * 65536)
    restored_snap, vm = await svc.restore(snap.id)
    assert disk.read_bytes() == b"A" * 65536
    assert vm.state == VMState.STOPPED, "a disk-only snapshot leaves the VM as it was: stopped"
    assert not list(disk.parent.glob(".disk.raw.stoker-restore-*"))
    assert any("restored from snapshot" in m for m in messages(db))
    assert restored_snap.id == snap.id


async def test_verify_finds_damage_and_records_it(world):
    make, *_ = world
    svc = make()
    snap = await svc.create("web")
    ok = await svc.verify(snap.id)
    assert ok.verified is not None and ok.verified.ok and "2 files match" in ok.verified.detail
    path = Path(snap.path) / "disks" / "vd0.raw"
    path.write_bytes(b"X" + path.read_bytes()[1:])
    bad = await svc.verify(snap.id)
    assert bad.verified is not None and not bad.verified.ok
    assert "disks/vd0.raw checksum mismatch" in bad.verified.detail
    (Path(snap.path) / "stray").write_text("x")
    path.unlink()
    worse = await svc.verify(snap.id)
    assert "disks/vd0.raw is missing" in worse.verified.detail
    assert "stray is not in the manifest" in worse.verified.detail


async def test_space_check_refuses_and_leaves_nothing(world):
    make, lifecycle, *_ = world
    svc = make(margin_mib=1 << 40)
    with pytest.raises(InsufficientSpace) as info:
        await svc.create("web")
    assert info.value.status == 409
    assert "not enough free disk space" in info.value.detail
    snapdir = lifecycle.paths(lifecycle.get("web").id).snapshots
    assert list(snapdir.iterdir()) == []
    assert svc.all() == []


async def test_prune_follows_policy_keeps_protected_and_frees_files(world):
    make, _lc, _disk, clock, db = world
    svc = make(timezone="UTC")
    ids = []
    for day in range(4):
        clock.now = T0 + timedelta(days=day)
        ids.append((await svc.create("web", kind="pre-update" if day == 0 else "manual")).id)
    assert svc.get(ids[0]).protected, "pre-update snapshots are kept until released"
    with pytest.raises(Conflict, match="no retention policy"):
        await svc.prune("web")
    with pytest.raises(InvalidSpec, match="did you mean 'daily'"):
        svc.set_policy("web", "dayly:2", None)
    with pytest.raises(InvalidSpec, match="interval"):
        svc.set_policy("web", "daily:2", "soon")
    policy = svc.set_policy("web", "daily:2", "1d")
    assert policy.retention == "daily:2" and policy.interval == "1d"

    plan = await svc.prune("web", dry_run=True)
    assert [i.id for i in plan.remove] == [ids[1]]
    assert {i.id: i.reasons for i in plan.keep} == {
        ids[0]: ("protected",),
        ids[2]: ("daily 2026-11-23",),
        ids[3]: ("daily 2026-11-24",),
    }
    assert Path(svc.get(ids[1]).path).is_dir(), "a dry run removes nothing"

    done = await svc.prune("web")
    assert [i.id for i in done.remove] == [ids[1]] and done.freed_bytes > 0
    assert [s.id for s in svc.all("web")] == [ids[0], ids[2], ids[3]]
    assert not (Path(svc.get(ids[0]).path).parent / ids[1]).exists()
    assert any(f"snapshot {ids[1]} pruned" in m for m in messages(db))

    with pytest.raises(Conflict, match="unprotect"):
        await svc.delete(ids[0])
    svc.set_protected(ids[0], False)
    assert json.loads((Path(svc.get(ids[0]).path) / MANIFEST).read_text())["protected"] is False
    assert await svc.delete(ids[0]) > 0
    assert [s.id for s in svc.all()] == [ids[2], ids[3]]


async def test_cleanup_at_start_removes_leftovers_and_reindexes(world):
    make, lifecycle, disk, _clock, db = world
    svc = make()
    kept = await svc.create("web")
    lost = await svc.create("web")
    snapdir = Path(kept.path).parent
    # a complete snapshot whose row was never written (crash right after the rename)
    orphan = await svc.create("web")
    svc.store.delete(orphan.id)
    # an interrupted snapshot, an interrupted delete, a lost directory, a half-restored disk
    (snapdir / ".tmp-x" / "disks").mkdir(parents=True)
    (snapdir / ".tmp-x" / "memory").write_bytes(b"half")
    os.rename(lost.path, snapdir / f".del-{lost.id}")
    stale = disk.with_name(f".{disk.name}.stoker-restore-zzz")
    stale.write_bytes(b"half")

    fresh = make()
    housekeeping = SnapshotHousekeeping(lifecycle.directory, fresh.store, lifecycle.events)
    housekeeping.cleanup_leftovers()
    assert sorted(p.name for p in snapdir.iterdir()) == sorted([kept.id, orphan.id])
    assert sorted(s.id for s in fresh.all()) == sorted([kept.id, orphan.id])
    assert not stale.exists()
    assert housekeeping.interrupted == {lifecycle.get("web").id}
    assert any("removed interrupted snapshot x" in m for m in messages(db))


def test_growing_file_hasher_matches_a_plain_hash(tmp_path):
    target = tmp_path / "memory"
    hasher = GrowingFileHasher(target).start()
    blob = os.urandom(3 * 1024 * 1024 + 17)

    def writer() -> None:
        with open(target, "wb") as f:
            for i in range(0, len(blob), 65536):
                f.write(blob[i : i + 65536])
                f.flush()
                time.sleep(0.0005)

    thread = threading.Thread(target=writer)
    thread.start()
    thread.join()
    result = hasher.finish()
    assert result == {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    tree = hash_tree(tmp_path, {"memory": result})
    assert tree["memory"] == result


def test_hash_tree_refuses_a_file_that_changed_after_hashing(tmp_path):
    (tmp_path / "memory").write_bytes(b"abc")
    with pytest.raises(OSError, match="changed after it was hashed"):
        hash_tree(tmp_path, {"memory": {"size": 2, "sha256": "x"}})
