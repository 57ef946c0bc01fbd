"""Snapshots and snapshot policies as records: what the snapshot service, the store and the
API share (the snapshot directory with its manifest stays the truth)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal


@dataclass(frozen=True)
class VerifyRecord:
    at: datetime
    ok: bool
    deep: bool
    detail: str
    duration_s: float


@dataclass(frozen=True)
class SnapshotRecord:
    """One snapshot; satisfies ``domain.retention.SnapshotLike`` (id, created, protected)."""

    id: str
    vm_id: str
    vm_name: str
    created: datetime
    kind: str
    tags: tuple[str, ...]
    protected: bool
    with_memory: bool
    size_bytes: int
    path: str
    pause_s: float | None = None
    verified: VerifyRecord | None = None


@dataclass(frozen=True)
class PolicyRecord:
    vm_id: str
    retention: str | None
    interval_s: int | None
    last_auto_at: datetime | None
    updated_at: datetime
    extra: dict[str, Any] = field(default_factory=dict)


#: what deleting a VM does with its snapshots: ``keep`` them (restorable into a new VM
#: later) or ``delete`` them; a VM with snapshots is never deleted without saying which
SnapshotsOnDelete = Literal["keep", "delete"]
