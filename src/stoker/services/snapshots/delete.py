"""Deleting snapshots so a crash never leaves half of one in the list.

The directory is hidden with one rename (``.del-<id>``) before its row is dropped and its
space freed; the start-up cleanup finishes a deletion a crash interrupted. Pruning removes
snapshots the same way.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from stoker.domain.events import EventType
from stoker.domain.snapshots import SnapshotRecord
from stoker.domain.units import format_size
from stoker.host.disk import dir_size
from stoker.services.errors import Conflict
from stoker.services.snapshots import layout
from stoker.services.snapshots.context import SnapshotContext
from stoker.services.snapshots.files import fsync_path
from stoker.store.snapshots import SnapshotStore


async def delete_snapshot(ctx: SnapshotContext, snapshot_id: str, force: bool = False) -> int:
    """Delete a snapshot the user asked for; protected ones only with ``force``."""
    snap = ctx.get(snapshot_id)
    if snap.protected and not force:
        what = "a pre-update snapshot" if snap.kind == "pre-update" else "protected"
        raise Conflict(
            f"snapshot {snap.id} is {what}: release it first "
            f"(`stoker snapshot unprotect {snap.id}`) or delete with force"
        )
    async with ctx.vm_lock(snap.vm_id):
        freed = await remove_snapshot(ctx, ctx.get(snapshot_id))
    ctx.events.publish(
        EventType.SNAPSHOT_DELETED,
        f"{snap.vm_name}: snapshot {snap.id} deleted, {format_size(freed)} freed",
        snap.vm_id,
        snapshot=snap.id,
        freed_bytes=freed,
    )
    return freed


async def remove_snapshot(ctx: SnapshotContext, snap: SnapshotRecord) -> int:
    """Hide the directory with one rename, drop the row, then free the space (bytes freed).
    The caller holds the VM's snapshot lock."""
    return await remove_snapshot_files(ctx.store, snap)


async def remove_snapshot_files(store: SnapshotStore, snap: SnapshotRecord) -> int:
    """``remove_snapshot`` for callers without a snapshot context (a VM's deletion)."""
    final = Path(snap.path)
    dead = layout.tombstone(final, snap.id)
    size = 0
    if final.exists():
        size = await asyncio.to_thread(dir_size, final)
        os.rename(final, dead)
        fsync_path(final.parent)
    store.delete(snap.id)
    await asyncio.to_thread(shutil.rmtree, dead, True)
    return size
