"""What every snapshot operation shares: collaborators, the clock and zone, per-VM locks.

The operations (create, restore, verify, prune, ...) live in their own modules as functions
of this context, so each can be read alone while all of them serialise on the same lock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, tzinfo

from stoker.domain.refs import Candidate
from stoker.domain.snapshots import SnapshotRecord
from stoker.services.errors import NotFound
from stoker.services.events import EventBus
from stoker.services.lifecycle import Lifecycle
from stoker.services.refs import by_prefix
from stoker.services.snapshots.config import SnapshotsConfig
from stoker.store.snapshots import SnapshotStore


@dataclass
class SnapshotContext:
    lifecycle: Lifecycle
    store: SnapshotStore
    config: SnapshotsConfig
    clock: Callable[[], datetime]
    tz: tzinfo
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    @property
    def events(self) -> EventBus:
        return self.lifecycle.events

    def vm_lock(self, vm_id: str) -> asyncio.Lock:
        """Serialises snapshot work on one VM (create, restore, delete, prune, verify)."""
        return self.locks.setdefault(vm_id, asyncio.Lock())

    def get(self, snapshot_id: str) -> SnapshotRecord:
        snap = self.store.get(snapshot_id)
        if snap is None:
            candidates = (Candidate(s.id, s.vm_name) for s in self.store.all())
            found = by_prefix("snapshot", snapshot_id, candidates)
            snap = None if found is None else self.store.get(found)
        if snap is None:
            raise NotFound(f"no snapshot with id {snapshot_id!r} (see `stoker snapshot list`)")
        return snap
