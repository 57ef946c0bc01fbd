"""A VM's snapshot policy: retention rules and the automatic snapshot interval.

Both are validated (and the rules canonicalised) when set, so pruning and the timer never
meet a policy they cannot read.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from stoker.domain import retention
from stoker.domain.events import EventType
from stoker.domain.snapshots import PolicyRecord
from stoker.domain.vm import VM
from stoker.services.errors import InvalidSpec
from stoker.services.snapshots.config import zone_name
from stoker.services.snapshots.context import SnapshotContext


@dataclass(frozen=True)
class Policy:
    vm_id: str
    vm_name: str
    retention: str | None
    interval: str | None
    timezone: str
    last_auto_at: datetime | None
    next_auto_at: datetime | None


def next_auto_at(rec: PolicyRecord) -> datetime | None:
    """When the next automatic snapshot is due (``None``: no interval set)."""
    if not rec.interval_s:
        return None
    return (rec.last_auto_at or rec.updated_at) + timedelta(seconds=rec.interval_s)


def get_policy(ctx: SnapshotContext, vm_ref: str) -> Policy:
    vm = ctx.lifecycle.get(vm_ref, 0)
    return _policy_of(ctx, vm, ctx.store.get_policy(vm.id))


def _policy_of(ctx: SnapshotContext, vm: VM, rec: PolicyRecord | None) -> Policy:
    interval = None
    if rec is not None and rec.interval_s:
        interval = retention.format_duration(timedelta(seconds=rec.interval_s))
    return Policy(
        vm_id=vm.id,
        vm_name=vm.name,
        retention=rec.retention if rec else None,
        interval=interval,
        timezone=zone_name(ctx.tz),
        last_auto_at=rec.last_auto_at if rec else None,
        next_auto_at=next_auto_at(rec) if rec else None,
    )


def set_policy(
    ctx: SnapshotContext, vm_ref: str, retention_text: str | None, interval: str | None
) -> Policy:
    vm = ctx.lifecycle.get(vm_ref, 0)
    canonical = None
    if retention_text is not None and retention_text.strip():
        try:
            canonical = str(retention.parse_policy(retention_text))
        except ValueError as exc:
            raise InvalidSpec("retention", str(exc)) from None
    interval_s = None
    if interval is not None and interval.strip():
        try:
            step = retention.parse_duration(interval)
        except ValueError as exc:
            raise InvalidSpec("interval", str(exc)) from None
        if step < timedelta(minutes=1):
            raise InvalidSpec("interval", "must be at least 1m")
        interval_s = int(step.total_seconds())
    ctx.store.put_policy(vm.id, canonical, interval_s, ctx.clock())
    policy = get_policy(ctx, vm.id)
    ctx.events.publish(
        EventType.SNAPSHOT_POLICY,
        f"{vm.name}: snapshot policy set: retention {canonical or 'none'}, "
        f"automatic every {policy.interval or 'never'}",
        vm.id,
        retention=canonical,
        interval=policy.interval,
    )
    return policy
