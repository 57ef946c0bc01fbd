"""Automatic snapshots: one now followed by pruning, and the built-in timer's tick that
takes them when a VM's interval is due (until the scheduler capability owns the timing).

Failures are reported as events, never raised out of the tick, so one VM's full disk does
not stop the others' snapshots.
"""

from __future__ import annotations

from dataclasses import dataclass

from stoker.domain.events import EventType
from stoker.domain.snapshots import SnapshotRecord
from stoker.domain.states import VMState
from stoker.services.errors import ServiceError
from stoker.services.snapshots.context import SnapshotContext
from stoker.services.snapshots.create import create_snapshot
from stoker.services.snapshots.policy import next_auto_at
from stoker.services.snapshots.prune import PruneResult, prune_snapshots


@dataclass(frozen=True)
class AutoResult:
    snapshot: SnapshotRecord
    prune: PruneResult | None


async def auto_snapshot(ctx: SnapshotContext, vm_ref: str) -> AutoResult:
    """An automatic snapshot now, then pruning by the VM's policy (the scheduler calls
    this; so does the built-in timer until a scheduler takes over)."""
    vm = ctx.lifecycle.get(vm_ref, 0)
    rec = ctx.store.get_policy(vm.id)
    if rec is not None:
        ctx.store.set_last_auto(vm.id, ctx.clock())
    snap = await create_snapshot(ctx, vm.id, kind="auto")
    pruned = None
    if rec is not None and rec.retention:
        pruned = await prune_snapshots(ctx, vm.id)
    return AutoResult(snap, pruned)


async def run_due(ctx: SnapshotContext) -> None:
    """One tick of the built-in timer: auto-snapshot every running VM that is due."""
    now = ctx.clock()
    for rec in ctx.store.policies():
        due = next_auto_at(rec)
        if due is None:
            continue
        vm = ctx.lifecycle.vms.get(rec.vm_id)
        if vm is None:
            ctx.store.delete_policy(rec.vm_id)
            continue
        if now < due or vm.state != VMState.RUNNING:
            continue
        try:
            await auto_snapshot(ctx, vm.id)
        except ServiceError as exc:
            ctx.events.publish(
                EventType.SNAPSHOT_AUTO_FAILED,
                f"{vm.name}: automatic snapshot failed: {exc.detail}",
                vm.id,
            )
