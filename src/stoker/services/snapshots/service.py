"""``SnapshotService``: the one object the API, the scheduler and the agent talk to.

It only holds the shared context and hands each call to the module that does that job, so
callers see one stable interface while the work stays in small modules.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from stoker.domain.events import Event, EventType
from stoker.domain.snapshots import SnapshotRecord
from stoker.domain.vm import VM
from stoker.services.errors import NotFound
from stoker.services.lifecycle import Lifecycle
from stoker.services.snapshots import automation, layout, policy
from stoker.services.snapshots.automation import AutoResult
from stoker.services.snapshots.config import SnapshotsConfig
from stoker.services.snapshots.context import SnapshotContext
from stoker.services.snapshots.create import Kind, create_snapshot
from stoker.services.snapshots.delete import delete_snapshot
from stoker.services.snapshots.policy import Policy
from stoker.services.snapshots.protection import set_protected
from stoker.services.snapshots.prune import PruneResult, prune_snapshots
from stoker.services.snapshots.restore import restore_as_new_vm, restore_snapshot
from stoker.services.snapshots.verify import verify_snapshot
from stoker.store.snapshots import SnapshotStore


class SnapshotService:
    def __init__(
        self,
        lifecycle: Lifecycle,
        store: SnapshotStore,
        config: SnapshotsConfig,
        clock: Callable[[], datetime] | None = None,
        locks: dict[str, asyncio.Lock] | None = None,
    ) -> None:
        """``locks``: the per-VM snapshot locks, shared with whoever else must exclude
        snapshot work (the housekeeping, which a VM's deletion goes through)."""
        self.ctx = SnapshotContext(
            lifecycle=lifecycle,
            store=store,
            config=config,
            clock=clock or (lambda: datetime.now(UTC)),
            tz=config.zone(),
            locks=locks if locks is not None else {},
        )
        self.lifecycle = lifecycle
        self.store = store
        self.config = config

    # ---------------------------------------------------------------------------- queries

    def get(self, snapshot_id: str) -> SnapshotRecord:
        return self.ctx.get(snapshot_id)

    def all(self, vm_ref: str | None = None) -> list[SnapshotRecord]:
        if vm_ref is None:
            return self.store.all()
        vm = self.lifecycle.directory.lookup(vm_ref)
        if vm is not None:
            return self.store.all(vm.id)
        # a deleted VM, by id or name: the snapshots kept when it was deleted
        kept = [s for s in self.store.all() if vm_ref in (s.vm_id, s.vm_name)]
        if not kept:
            raise NotFound(f"no VM named or with id {vm_ref!r}, and no snapshots kept of one")
        return kept

    def manifest(self, snap: SnapshotRecord) -> dict[str, Any]:
        return layout.read_manifest(snap)

    # ------------------------------------------------------------------------ operations

    async def create(
        self,
        vm_ref: str,
        kind: Kind = "manual",
        tags: tuple[str, ...] = (),
        protected: bool | None = None,
    ) -> SnapshotRecord:
        return await create_snapshot(self.ctx, vm_ref, kind, tags, protected)

    async def restore(
        self, snapshot_id: str, as_name: str | None = None
    ) -> tuple[SnapshotRecord, VM]:
        """Into the snapshot's own VM, or (``as_name``) into a new VM of that name."""
        if as_name is not None:
            return await restore_as_new_vm(self.ctx, snapshot_id, as_name)
        return await restore_snapshot(self.ctx, snapshot_id)

    async def delete(self, snapshot_id: str, force: bool = False) -> int:
        return await delete_snapshot(self.ctx, snapshot_id, force)

    def set_protected(self, snapshot_id: str, protected: bool) -> SnapshotRecord:
        return set_protected(self.ctx, snapshot_id, protected)

    async def verify(self, snapshot_id: str, deep: bool = False) -> SnapshotRecord:
        return await verify_snapshot(self.ctx, snapshot_id, deep)

    # ------------------------------------------------------------------- policy and prune

    def get_policy(self, vm_ref: str) -> Policy:
        return policy.get_policy(self.ctx, vm_ref)

    def set_policy(self, vm_ref: str, retention_text: str | None, interval: str | None) -> Policy:
        return policy.set_policy(self.ctx, vm_ref, retention_text, interval)

    async def prune(self, vm_ref: str, dry_run: bool = False) -> PruneResult:
        return await prune_snapshots(self.ctx, vm_ref, dry_run)

    async def auto_snapshot(self, vm_ref: str) -> AutoResult:
        return await automation.auto_snapshot(self.ctx, vm_ref)

    async def run_due(self) -> None:
        await automation.run_due(self.ctx)

    def on_event(self, event: Event) -> None:
        """A deleted VM's snapshot lock goes with it (its rows go in the housekeeping)."""
        if event.type == EventType.VM_DELETED and event.vm_id:
            self.ctx.locks.pop(event.vm_id, None)
