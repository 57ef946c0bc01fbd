"""What the agent keeps about manifests: who manages each object, and the last apply.

An object an apply created or took over has a :class:`ManagedObject` row: its kind and name,
the id of the object it was (a VM deleted by hand and made again under the same name is not
the managed one any more), and the values the apply set on it, which the next plan compares
with the host to report changes made by hand. Rows are written object by object as an apply
goes, so an apply cut short leaves an exact account of what it did.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

#: the kinds of object a manifest manages, as the store names them
MANAGED_KINDS = ("network", "vm", "quota", "snapshot_policy", "schedule")


@dataclass(frozen=True)
class ManagedObject:
    kind: str
    name: str
    #: the live object's id (for a quota or a snapshot policy, its VM's id)
    object_id: str
    #: the values the last apply set on it (None: none yet, only ``pending``)
    applied: dict[str, Any] | None
    updated_at: datetime
    #: the values a step is setting right now: written before the service call, cleared
    #: after it, so a crash in between is resolved by looking at the object itself
    pending: dict[str, Any] | None = None


@dataclass(frozen=True)
class ManifestSource:
    """One file of a manifest as it was applied: its name as the operator gave it, its text."""

    name: str
    content: str


@dataclass(frozen=True)
class ManifestHead:
    """The last apply that finished, and one that started and did not (an agent that died
    mid-apply, or a step that failed): applying the manifest again finishes it."""

    manifest_hash: str | None
    sources: tuple[ManifestSource, ...] = ()
    summary: dict[str, int] = field(default_factory=dict)
    applied_at: datetime | None = None
    #: "api" (plan/apply requests) or "file" (``stoker agent --manifest``)
    origin: str | None = None
    applying_hash: str | None = None
    applying_since: datetime | None = None
    #: why the unfinished apply stopped, when it failed rather than died
    failure: str | None = None
