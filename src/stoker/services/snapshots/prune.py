"""Pruning: remove the snapshots a VM's retention policy does not keep, with the reason
for every kept one (``domain.retention`` decides; this module acts and reports)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from stoker.domain import retention
from stoker.domain.events import EventType
from stoker.domain.units import format_size
from stoker.services.errors import Conflict
from stoker.services.snapshots.config import zone_name
from stoker.services.snapshots.context import SnapshotContext
from stoker.services.snapshots.delete import remove_snapshot


@dataclass(frozen=True)
class PruneItem:
    id: str
    created: datetime
    reasons: tuple[str, ...]
    size_bytes: int


@dataclass(frozen=True)
class PruneResult:
    vm_id: str
    vm_name: str
    policy: str
    timezone: str
    dry_run: bool
    keep: tuple[PruneItem, ...]
    remove: tuple[PruneItem, ...]
    freed_bytes: int


async def prune_snapshots(ctx: SnapshotContext, vm_ref: str, dry_run: bool = False) -> PruneResult:
    """Apply the VM's retention policy; protected and pre-update snapshots always stay."""
    vm = ctx.lifecycle.get(vm_ref, 0)
    rec = ctx.store.get_policy(vm.id)
    if rec is None or not rec.retention:
        raise Conflict(
            f"{vm.name} has no retention policy: set one first, for example "
            f'`stoker snapshot set-policy {vm.name} "daily:7,weekly:4"`'
        )
    async with ctx.vm_lock(vm.id):
        snaps = {s.id: s for s in ctx.store.all(vm.id)}
        decided = retention.plan(snaps.values(), rec.retention, ctx.tz)
        keep = tuple(
            PruneItem(k.id, k.created, k.reasons, snaps[k.id].size_bytes) for k in decided.keep
        )
        why = f"not kept by any rule of {rec.retention}"
        dropped = tuple(
            PruneItem(i, snaps[i].created, (why,), snaps[i].size_bytes) for i in decided.remove
        )
        freed = 0
        if not dry_run:
            for item in dropped:
                size = await remove_snapshot(ctx, snaps[item.id])
                freed += size
                ctx.events.publish(
                    EventType.SNAPSHOT_PRUNED,
                    f"{vm.name}: snapshot {item.id} pruned ({why}), {format_size(size)} freed",
                    vm.id,
                    snapshot=item.id,
                    created=item.created.isoformat(),
                    reason=why,
                    freed_bytes=size,
                )
    return PruneResult(
        vm_id=vm.id,
        vm_name=vm.name,
        policy=rec.retention,
        timezone=zone_name(ctx.tz),
        dry_run=dry_run,
        keep=keep,
        remove=dropped,
        freed_bytes=freed if not dry_run else sum(i.size_bytes for i in dropped),
    )
