"""What deleting a VM does to its snapshots: snapshots are backups, so none goes silently.

A VM with snapshots is deleted only when the request says what to do with them:

- ``keep``: each snapshot directory moves (one rename, same file system) from the VM's
  directory to ``<data_dir>/kept-snapshots/<id>/`` and its index row follows, so it stays
  listed and can be restored into a new VM (``stoker snapshot restore ID --as NAME``);
- ``delete``: each is removed the way ``snapshot delete`` removes one (rename to a
  tombstone, drop the row, free the space), with a ``snapshot.deleted`` event each.

Protected snapshots (pre-update ones included) are never removed by a VM delete: ``delete``
is refused naming them; release them first or keep them.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from stoker.domain.events import EventType
from stoker.domain.snapshots import SnapshotRecord, SnapshotsOnDelete
from stoker.domain.units import format_size
from stoker.domain.vm import VM
from stoker.services.errors import Conflict
from stoker.services.events import EventBus
from stoker.services.snapshots.delete import remove_snapshot_files
from stoker.services.snapshots.files import fsync_path
from stoker.store.snapshots import SnapshotStore

#: at most this many snapshot ids are named in a refusal
_SHOWN = 10


def _ids(snaps: list[SnapshotRecord]) -> str:
    shown = ", ".join(s.id for s in snaps[:_SHOWN])
    return shown + (f" and {len(snaps) - _SHOWN} more" if len(snaps) > _SHOWN else "")


def check_delete(vm: VM, snaps: list[SnapshotRecord], mode: SnapshotsOnDelete | None) -> None:
    """Refuse (409) a deletion that would lose snapshots nobody decided about."""
    if not snaps:
        return
    if mode is None:
        raise Conflict(
            f"{vm.name} has {len(snaps)} snapshot{'s' if len(snaps) != 1 else ''} "
            f"({_ids(snaps)}); say what to do with them: keep them (`stoker vm delete "
            f"{vm.name} --snapshots keep`, API `snapshots=keep`; restore one later with "
            "`stoker snapshot restore ID --as NEWNAME`) or delete them (`--snapshots delete`)",
            snapshots=len(snaps),
        )
    protected = [s for s in snaps if s.protected]
    if mode == "delete" and protected:
        raise Conflict(
            f"{vm.name} has {len(protected)} protected snapshot"
            f"{'s' if len(protected) != 1 else ''} ({_ids(protected)}), which a VM delete "
            "never removes: keep them (`--snapshots keep`) or release them first "
            f"(`stoker snapshot unprotect {protected[0].id}`)",
            protected=[s.id for s in protected],
        )


async def keep_snapshots(
    store: SnapshotStore, events: EventBus, vm: VM, snaps: list[SnapshotRecord], kept: Path
) -> None:
    """Move each snapshot out of the VM's directory, then point its row at the new place.

    A crash between the rename and the row update leaves a row whose path is gone and a
    directory under ``kept``: the start-up cleanup finds the directory by id and repairs the
    row, so a kept snapshot is never dropped as lost."""
    kept.mkdir(mode=0o700, exist_ok=True)
    for snap in snaps:
        source, target = Path(snap.path), kept / snap.id
        if source != target and source.exists():
            os.rename(source, target)
            await asyncio.to_thread(fsync_path, kept)
            await asyncio.to_thread(fsync_path, source.parent)
        store.set_path(snap.id, str(target))
        events.publish(
            EventType.SNAPSHOT_KEPT,
            f"{vm.name}: snapshot {snap.id} kept after the VM's deletion "
            f"(restore with `stoker snapshot restore {snap.id} --as NEWNAME`)",
            vm.id,
            snapshot=snap.id,
            path=str(target),
        )


async def delete_snapshots(
    store: SnapshotStore, events: EventBus, vm: VM, snaps: list[SnapshotRecord]
) -> None:
    """Remove each snapshot as ``snapshot delete`` would, one event each."""
    for snap in snaps:
        freed = await remove_snapshot_files(store, snap)
        events.publish(
            EventType.SNAPSHOT_DELETED,
            f"{vm.name}: snapshot {snap.id} deleted with its VM, {format_size(freed)} freed",
            vm.id,
            snapshot=snap.id,
            freed_bytes=freed,
            with_vm=True,
        )
