"""Reconciling disk, index and VMs after what a crash or a VM deletion left behind.

The snapshot directories are the truth and the index follows them: at agent start,
interrupted work is removed (and a VM a crash left paused is resumed once re-adopted),
complete directories without a row are indexed (kept snapshots of deleted VMs too), rows
whose directory moved are pointed at it, rows without a directory dropped, and the
directory of a VM that no longer exists is removed once its snapshots are kept. A VM is
deleted only together with a decision about its snapshots (``on_vm_delete``), under the
VM's snapshot lock, so a snapshot being taken and the VM's deletion never interleave.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

from stoker.domain.events import Event, EventType
from stoker.domain.snapshots import SnapshotRecord, SnapshotsOnDelete
from stoker.domain.vm import VM
from stoker.drivers.base import VMM
from stoker.host.proc import find_processes_with_arg, kill
from stoker.services.directory import VMDirectory
from stoker.services.events import EventBus
from stoker.services.interrupted import resume_interrupted
from stoker.services.snapshots import layout, on_vm_delete
from stoker.store.snapshots import SnapshotStore

log = logging.getLogger("stoker.snapshots")


class SnapshotHousekeeping:
    """Start-up reconciliation and the after-effects of crashes and deletions.

    It is built before the lifecycle (which tells it, as a VMM observer, when a VM a crash
    left paused is up again) and needs nothing of the snapshot operations themselves.
    """

    def __init__(self, directory: VMDirectory, store: SnapshotStore, events: EventBus) -> None:
        self.directory = directory
        self.store = store
        self.events = events
        #: VMs whose snapshot was interrupted by an agent crash: resume them when re-adopted
        self.interrupted: set[str] = set()
        #: per VM: held while a snapshot of it is taken, restored, verified or removed, and
        #: while the VM is deleted (the snapshot service shares this table)
        self.locks: dict[str, asyncio.Lock] = {}

    @property
    def kept_dir(self) -> Path:
        return self.directory.data_dir / layout.KEPT_DIR

    # ------------------------------------------------------------------ a VM's deletion

    def vm_lock(self, vm_id: str) -> asyncio.Lock:
        """The VM's snapshot lock (taken before the lifecycle's own lock, never after)."""
        return self.locks.setdefault(vm_id, asyncio.Lock())

    def check_delete(self, vm: VM, mode: SnapshotsOnDelete | None) -> None:
        """Raise Conflict when deleting ``vm`` would lose snapshots nobody decided about."""
        on_vm_delete.check_delete(vm, self._of_vm(vm), mode)

    async def on_delete(self, vm: VM, mode: SnapshotsOnDelete | None) -> None:
        """The VM's VMM is gone and its directory is about to be removed: keep or remove its
        snapshots as asked (``check_delete`` passed)."""
        snaps = self._of_vm(vm)
        if not snaps:
            return
        if mode == "keep":
            await on_vm_delete.keep_snapshots(self.store, self.events, vm, snaps, self.kept_dir)
        elif mode == "delete":
            await on_vm_delete.delete_snapshots(self.store, self.events, vm, snaps)

    def _of_vm(self, vm: VM) -> list[SnapshotRecord]:
        """The VM's snapshots still in its directory (kept ones have moved out)."""
        return [s for s in self.store.all(vm.id) if not self._is_kept(Path(s.path))]

    def _is_kept(self, path: Path) -> bool:
        return path.parent == self.kept_dir

    # ------------------------------------------------------------------------ agent start

    def cleanup_leftovers(self) -> None:
        """Remove what interrupted work left (temp, half-deleted and verify directories,
        half-restored disks), index orphans, repair rows whose directory moved, drop rows
        whose directory is gone, and clear the directories of VMs that no longer exist."""
        rows = {s.id: s for s in self.store.all()}
        vms = self.directory.all()
        for vm in vms:
            snapdir = self.directory.paths(vm.id).snapshots
            entries = list(snapdir.iterdir()) if snapdir.is_dir() else []
            for entry in entries:
                self._clean_entry(vm, entry, rows)
            for drive in vm.spec.drives:
                for stale in layout.restore_leftovers(Path(drive.path)):
                    stale.unlink(missing_ok=True)
        self._clean_kept(rows)
        self._clean_vm_dirs_without_vm({vm.id for vm in vms}, rows)
        for snap in rows.values():
            if Path(snap.path).is_dir():
                continue
            moved = self.kept_dir / snap.id
            if moved.is_dir():  # kept, and the agent died before the row followed
                self.store.set_path(snap.id, str(moved))
                continue
            self.store.delete(snap.id)
            self.events.publish(
                EventType.SNAPSHOT_LOST,
                f"{snap.vm_name}: snapshot {snap.id} is gone from disk; dropped from the list",
                snap.vm_id,
                snapshot=snap.id,
            )

    def _clean_kept(self, rows: dict[str, SnapshotRecord]) -> None:
        """Kept snapshots of deleted VMs: finish interrupted deletions, index orphans."""
        if not self.kept_dir.is_dir():
            return
        for entry in self.kept_dir.iterdir():
            name = entry.name
            if name.startswith((layout.DEL_PREFIX, layout.TMP_PREFIX)):
                shutil.rmtree(entry, ignore_errors=True)
                snapshot_id = name.removeprefix(layout.DEL_PREFIX)
                if snapshot_id in rows:
                    self.store.delete(snapshot_id)
                    rows.pop(snapshot_id)
            elif entry.is_dir() and name not in rows:
                self._adopt(None, entry)
            elif name in rows and Path(rows[name].path) != entry:
                self.store.set_path(name, str(entry))
                rows.pop(name)

    def _clean_vm_dirs_without_vm(self, known: set[str], rows: dict[str, SnapshotRecord]) -> None:
        """``vms/<id>`` of a VM that no longer exists (a database restored from an older
        backup, a deletion the agent did not finish): its complete snapshots become kept
        snapshots (nothing is lost), the rest is removed, unless a VMM still runs there."""
        vms_dir = self.directory.data_dir / "vms"
        if not vms_dir.is_dir():
            return
        for vm_dir in vms_dir.iterdir():
            if vm_dir.name in known or not vm_dir.is_dir():
                continue
            # a VMM names its directory, or (confined, holding descriptors) its VM's id
            running = find_processes_with_arg(str(vm_dir)) or find_processes_with_arg(
                f"stoker-{vm_dir.name}"
            )
            if running:
                log.error(
                    "%s belongs to no VM but a VMM (pid %s) runs from it; left alone: stop that "
                    "process or restore the database that knows the VM",
                    vm_dir,
                    ", ".join(map(str, running)),
                )
                continue
            snapdir = vm_dir / "snapshots"
            for entry in snapdir.iterdir() if snapdir.is_dir() else []:
                if entry.name.startswith(".") or not (entry / layout.MANIFEST).is_file():
                    continue
                self.kept_dir.mkdir(mode=0o700, exist_ok=True)
                target = self.kept_dir / entry.name
                if not target.exists():
                    entry.rename(target)
                    if entry.name in rows:
                        self.store.set_path(entry.name, str(target))
                        rows.pop(entry.name)
                    else:
                        self._adopt(None, target)
                    log.warning("kept snapshot %s of a VM that no longer exists", entry.name)
            shutil.rmtree(vm_dir, ignore_errors=True)
            log.warning("removed %s: no VM has that id", vm_dir)

    def _clean_entry(self, vm: VM, entry: Path, rows: dict[str, SnapshotRecord]) -> None:
        """One entry of a VM's snapshot directory; ``rows`` loses the ids finished here."""
        name = entry.name
        if name.startswith(layout.TMP_PREFIX):
            snapshot_id = name.removeprefix(layout.TMP_PREFIX)
            shutil.rmtree(entry, ignore_errors=True)
            self.interrupted.add(vm.id)
            self.events.publish(
                EventType.SNAPSHOT_CLEANED,
                f"{vm.name}: removed interrupted snapshot {snapshot_id}",
                vm.id,
                snapshot=snapshot_id,
            )
        elif name.startswith(layout.DEL_PREFIX):
            snapshot_id = name.removeprefix(layout.DEL_PREFIX)
            shutil.rmtree(entry, ignore_errors=True)
            if snapshot_id in rows:
                self.store.delete(snapshot_id)
                rows.pop(snapshot_id)
        elif name.startswith(layout.VERIFY_PREFIX):
            for pid in find_processes_with_arg(str(entry / "control.sock")):
                kill(pid)
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.is_dir() and name not in rows:
            self._adopt(vm, entry)

    def _adopt(self, vm: VM | None, entry: Path) -> None:
        """A complete snapshot whose row was never written (crash right after the rename);
        ``vm`` None: a kept snapshot, whose VM's id and name are in its manifest."""
        try:
            record = layout.record_from_manifest(vm, entry)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring %s: not a complete snapshot (%s)", entry, exc)
            return
        self.store.insert(record)

    async def vmm_up(self, vm: VM, vmm: VMM) -> None:
        """A VM paused by a snapshot the agent never finished runs again."""
        if vm.id not in self.interrupted:
            return
        self.interrupted.discard(vm.id)
        was = await resume_interrupted(vmm)
        if was is not None:
            self.events.publish(
                EventType.SNAPSHOT_RESUMED,
                f"{vm.name}: resumed after an interrupted snapshot (was {was})",
                vm.id,
            )

    def on_event(self, event: Event) -> None:
        """On ``vm.deleted``: its policy goes, and any row left pointing into its removed
        directory (kept snapshots stay: they live outside it)."""
        if event.type == EventType.VM_DELETED and event.vm_id:
            for snap in self.store.all(event.vm_id):
                if not self._is_kept(Path(snap.path)):
                    self.store.delete(snap.id)
            self.store.delete_policy(event.vm_id)
