"""Reconciling disk, index and VMs after what a crash or a VM deletion left behind.

The snapshot directories are the truth and the index follows them: at agent start,
interrupted work is removed (and a VM a crash left paused is resumed once re-adopted),
complete directories without a row are indexed, rows without a directory dropped; when a
VM is deleted, its snapshot rows and policy go with it.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path

from stoker.domain.events import Event, EventType
from stoker.domain.snapshots import SnapshotRecord
from stoker.domain.vm import VM
from stoker.drivers.base import VMM, DriverError, Unsupported
from stoker.host.proc import find_processes_with_arg, kill
from stoker.services.directory import VMDirectory
from stoker.services.events import EventBus
from stoker.services.snapshots import layout
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

    def cleanup_leftovers(self) -> None:
        """Remove what interrupted work left (temp, half-deleted and verify directories,
        half-restored disks), drop rows whose directory is gone, index orphans."""
        rows = {s.id: s for s in self.store.all()}
        for vm in self.directory.all():
            snapdir = self.directory.paths(vm.id).snapshots
            entries = list(snapdir.iterdir()) if snapdir.is_dir() else []
            for entry in entries:
                self._clean_entry(vm, entry, rows)
            for drive in vm.spec.drives:
                for stale in layout.restore_leftovers(Path(drive.path)):
                    stale.unlink(missing_ok=True)
        for snap in rows.values():
            if not Path(snap.path).is_dir():
                self.store.delete(snap.id)
                self.events.publish(
                    EventType.SNAPSHOT_LOST,
                    f"{snap.vm_name}: snapshot {snap.id} is gone from disk; dropped from the list",
                    snap.vm_id,
                    snapshot=snap.id,
                )

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

    def _adopt(self, vm: VM, entry: Path) -> None:
        """A complete snapshot whose row was never written (crash right after the rename)."""
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
        with contextlib.suppress(DriverError, Unsupported):
            await vmm.cancel_state_save()
        status = await vmm.status(2.0)
        if not status.running:
            await vmm.resume()
            self.events.publish(
                EventType.SNAPSHOT_RESUMED,
                f"{vm.name}: resumed after an interrupted snapshot (was {status.status})",
                vm.id,
            )

    def on_event(self, event: Event) -> None:
        """On ``vm.deleted``: its snapshot rows and policy go (its directory went with it)."""
        if event.type == EventType.VM_DELETED and event.vm_id:
            for snap in self.store.all(event.vm_id):
                self.store.delete(snap.id)
            self.store.delete_policy(event.vm_id)
