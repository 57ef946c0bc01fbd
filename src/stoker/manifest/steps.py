"""The vocabulary of a plan: what kind of object, what happens to it, which fields change."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from stoker.domain.quota import Quota
from stoker.manifest.model import SnapshotPolicySpec
from stoker.manifest.state import NetworkRecord, ScheduleState, VMRecord


class Kind(StrEnum):
    NETWORK = "network"
    VM = "vm"
    QUOTA = "quota"
    SNAPSHOT_POLICY = "snapshot_policy"
    SCHEDULE = "schedule"


class Op(StrEnum):
    CREATE = "create"
    #: the change reaches the object as it is (a stopped VM takes even memory in place)
    UPDATE = "update"
    #: stop, change, and start again (the start is a START step at the end of the plan)
    RESTART = "update-restart"
    #: a running VM needs a restart that was not allowed (no ``--restart``): the live part
    #: of the change is applied, the rest waits
    PENDING = "pending-restart"
    #: delete and create again (a network's subnet)
    REPLACE = "replace"
    DELETE = "delete"
    START = "start"
    STOP = "stop"


class _Absent:
    """A value that is not there at all (a label added, a quota field removed)."""

    def __repr__(self) -> str:
        return "(none)"


ABSENT: Final = _Absent()


@dataclass(frozen=True)
class Change:
    field: str
    old: Any
    new: Any
    #: this field reaches a running VM only through a restart
    restart: bool = False

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"field": self.field, "restart": self.restart}
        if self.old is not ABSENT:
            out["old"] = self.old
        if self.new is not ABSENT:
            out["new"] = self.new
        return out


Target = VMRecord | Quota | SnapshotPolicySpec | ScheduleState | NetworkRecord | None


@dataclass(frozen=True)
class Step:
    """One thing apply does. ``target`` is what to write: for a VM the record whose spec,
    warm start and network to store (for PENDING, the current spec with only the live fields
    changed); the quota, policy, schedule or network to set; None for a delete, start, stop."""

    kind: Kind
    op: Op
    name: str
    changes: tuple[Change, ...] = ()
    note: str = ""
    #: the object exists but was created by hand: apply takes it over (sets managed_by)
    adopt: bool = False
    target: Target = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": str(self.kind),
            "op": str(self.op),
            "name": self.name,
            "note": self.note,
            "adopt": self.adopt,
            "changes": [c.to_dict() for c in self.changes],
        }


@dataclass(frozen=True)
class Drift:
    """A managed object changed by hand since the last apply: ``field`` None means the
    object itself is gone."""

    kind: Kind
    name: str
    field: str | None
    applied: Any
    now: Any

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": str(self.kind), "name": self.name}
        if self.field is None:
            out["deleted"] = True
            return out
        out["field"] = self.field
        if self.applied is not ABSENT:
            out["applied"] = self.applied
        if self.now is not ABSENT:
            out["now"] = self.now
        return out
