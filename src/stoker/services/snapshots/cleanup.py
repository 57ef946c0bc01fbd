"""Reconciling disk, index and VMs after what a crash or a VM deletion left behind.

The snapshot directories are the truth and the index follows them: at agent start,
interrupted work is removed (and a VM a crash left paused is resumed once re-adopted),
complete directories without a row are indexed, rows without a directory dropped; when a
VM is deleted, its snapshot rows and policy go with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from pathlib import Path

from stoker.domain.events import Event, EventType
from stoker.domain.snapshots import SnapshotRecord
from stoker.domain.vm import VM
from stoker.drivers.base import VMM, DriverError
from stoker.host.proc import find_processes_with_arg, kill
from stoker.services.snapshots import layout
from stoker.services.snapshots.context import SnapshotContext

log = logging.getLogger("stoker.snapshots")


def cleanup_leftovers(ctx: SnapshotContext) -> None:
    """Remove what interrupted work left (temp, half-deleted and verify directories,
    half-restored disks), drop rows whose directory is gone, index orphans."""
    rows = {s.id: s for s in ctx.store.all()}
    for vm in ctx.lifecycle.vms.all():
        snapdir = ctx.lifecycle.paths(vm.id).snapshots
        entries = list(snapdir.iterdir()) if snapdir.is_dir() else []
        for entry in entries:
            _clean_entry(ctx, vm, entry, rows)
        for drive in vm.spec.drives:
            for stale in layout.restore_leftovers(Path(drive.path)):
                stale.unlink(missing_ok=True)
    for snap in rows.values():
        if not Path(snap.path).is_dir():
            ctx.store.delete(snap.id)
            ctx.events.publish(
                EventType.SNAPSHOT_LOST,
                f"{snap.vm_name}: snapshot {snap.id} is gone from disk; dropped from the list",
                snap.vm_id,
                snapshot=snap.id,
            )


def _clean_entry(
    ctx: SnapshotContext, vm: VM, entry: Path, rows: dict[str, SnapshotRecord]
) -> None:
    """One entry of a VM's snapshot directory; ``rows`` loses the ids finished here."""
    name = entry.name
    if name.startswith(layout.TMP_PREFIX):
        snapshot_id = name.removeprefix(layout.TMP_PREFIX)
        shutil.rmtree(entry, ignore_errors=True)
        ctx.interrupted.add(vm.id)
        ctx.events.publish(
            EventType.SNAPSHOT_CLEANED,
            f"{vm.name}: removed interrupted snapshot {snapshot_id}",
            vm.id,
            snapshot=snapshot_id,
        )
    elif name.startswith(layout.DEL_PREFIX):
        snapshot_id = name.removeprefix(layout.DEL_PREFIX)
        shutil.rmtree(entry, ignore_errors=True)
        if snapshot_id in rows:
            ctx.store.delete(snapshot_id)
            rows.pop(snapshot_id)
    elif name.startswith(layout.VERIFY_PREFIX):
        for pid in find_processes_with_arg(str(entry / "control.sock")):
            kill(pid)
        shutil.rmtree(entry, ignore_errors=True)
    elif entry.is_dir() and name not in rows:
        _adopt(ctx, vm, entry)


def _adopt(ctx: SnapshotContext, vm: VM, entry: Path) -> None:
    """A complete snapshot whose row was never written (crash right after the rename)."""
    try:
        record = layout.record_from_manifest(vm, entry)
    except (OSError, ValueError, KeyError) as exc:
        log.warning("ignoring %s: not a complete snapshot (%s)", entry, exc)
        return
    ctx.store.insert(record)


async def resume_interrupted(ctx: SnapshotContext, vm: VM, vmm: VMM) -> None:
    """on_vmm_up: a VM paused by a snapshot the agent never finished runs again."""
    if vm.id not in ctx.interrupted:
        return
    ctx.interrupted.discard(vm.id)
    execute = getattr(vmm, "execute", None)
    if execute is not None:
        with contextlib.suppress(DriverError):
            info = await execute("query-migrate")
            if info.get("status") in ("setup", "active", "pre-switchover", "device"):
                await execute("migrate_cancel")
                for _ in range(100):
                    info = await execute("query-migrate")
                    if info.get("status") not in ("active", "cancelling"):
                        break
                    await asyncio.sleep(0.05)
    status = await vmm.status(2.0)
    if not status.running:
        await vmm.resume()
        ctx.events.publish(
            EventType.SNAPSHOT_RESUMED,
            f"{vm.name}: resumed after an interrupted snapshot (was {status.status})",
            vm.id,
        )


def forget_vm(ctx: SnapshotContext, event: Event) -> None:
    """On ``vm.deleted``: its snapshot rows and policy go (its directory went with it)."""
    if event.type == EventType.VM_DELETED and event.vm_id:
        for snap in ctx.store.all(event.vm_id):
            ctx.store.delete(snap.id)
        ctx.store.delete_policy(event.vm_id)
        ctx.locks.pop(event.vm_id, None)
