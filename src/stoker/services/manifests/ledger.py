"""The managed objects' rows, written object by object as an apply goes.

Around each step the rows of the object it touches go through two writes: before the
service call, the values the step is about to set (``pending``); after it, those values as
applied. An apply cut short between the two (a crash, a failed call) leaves a row whose
pending values are resolved by looking at the object: if it has them, the call went through.
So the next plan neither repeats what was done nor reports it as a change by hand, and an
object is never counted twice. Rows are compared first: an unchanged row is not written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any

from stoker.domain.manifests import ManagedObject
from stoker.manifest import MANAGER, Kind, Op, Step
from stoker.manifest.plan import HostObjects
from stoker.store.manifests import ManifestStore

#: the rows that describe one VM: itself, its quota override, its snapshot policy
VM_ROWS = ("vm", "quota", "snapshot_policy")
Key = tuple[str, str]


def owner(kind: str, name: str) -> Key:
    """The object whose id a row carries: a quota or policy row carries its VM's."""
    return (kind if kind in ("schedule", "network") else "vm", name)


def row_keys(step: Step) -> tuple[Key, ...]:
    if step.kind in (Kind.VM, Kind.QUOTA, Kind.SNAPSHOT_POLICY):
        return tuple((kind, step.name) for kind in VM_ROWS)
    return ((str(step.kind), step.name),)


def row_value(key: Key, objects: HostObjects) -> dict[str, Any] | None:
    """What a row says about a managed object as ``objects`` has it (None: no row)."""
    kind, name = key
    if kind == "schedule":
        schedule = objects.schedules.get(name)
        return schedule.to_dict() if schedule and schedule.managed_by == MANAGER else None
    if kind == "network":
        network = objects.networks.get(name)
        return network.to_dict() if network and network.managed_by == MANAGER else None
    vm = objects.vms.get(name)
    if vm is None or vm.managed_by != MANAGER:
        return None
    if kind == "quota":
        return vm.quota.set_fields() if vm.quota else None
    if kind == "snapshot_policy":
        return vm.snapshot_policy.model_dump() if vm.snapshot_policy else None
    applied = replace(vm, quota=None, snapshot_policy=None).to_dict()
    applied.pop("state")  # schedules and operators start and stop VMs: not drift
    return applied


def resolved(rows: Mapping[Key, ManagedObject], now: HostObjects) -> Iterator[ManagedObject]:
    """Each row with a pending change settled: the object has the pending values (the call
    went through before the apply stopped) or it keeps what was applied before."""
    for row in rows.values():
        value = row.applied
        if row.pending is not None and row_value((row.kind, row.name), now) == row.pending:
            value = row.pending
        if value is not None:
            yield replace(row, applied=value, pending=None)


class Ledger:
    def __init__(
        self,
        store: ManifestStore,
        rows: Mapping[Key, ManagedObject],
        ids: dict[Key, str],
        clock: Callable[[], datetime],
    ) -> None:
        self.store = store
        self.rows = dict(rows)
        #: live object ids by (kind, name), kept current as steps create and delete
        self.ids = ids
        self.clock = clock

    def before(self, step: Step, objects: HostObjects) -> None:
        """Write what ``step`` is about to set on objects that already have an id and a
        row (a new object gets its row once it exists: one made but not recorded yet reads
        as made by hand, which the next apply takes over rather than making again)."""
        after = HostObjects(dict(objects.vms), dict(objects.schedules), dict(objects.networks))
        after.advance(step)
        for key in row_keys(step):
            object_id = self.ids.get(owner(*key))
            pending = row_value(key, after)
            row = self.rows.get(key)
            if object_id is None or pending is None or self.rows.get(owner(*key)) is None:
                continue
            if row is not None and (row.applied == pending or row.object_id != object_id):
                continue
            at = self.clock()
            self.store.intend(key[0], key[1], object_id, pending, at)
            applied = row.applied if row is not None else None
            self.rows[key] = ManagedObject(key[0], key[1], object_id, applied, at, pending)

    def record(self, step: Step, object_id: str | None, objects: HostObjects) -> None:
        """The rows of the object ``step`` touched, as it now is."""
        kind, name = owner(*row_keys(step)[0])
        if object_id is not None:
            self.ids[(kind, name)] = object_id
        elif step.op == Op.DELETE:
            self.ids.pop((kind, name), None)
        for key in row_keys(step):
            self._put(key, row_value(key, objects))

    def _put(self, key: Key, applied: dict[str, Any] | None) -> None:
        row = self.rows.get(key)
        object_id = self.ids.get(owner(*key))
        if applied is None or object_id is None:
            if row is not None:
                self.store.remove(*key)
                del self.rows[key]
            return
        if (
            row is not None
            and row.object_id == object_id
            and row.applied == applied
            and row.pending is None
        ):
            return
        at = self.clock()
        self.store.put(key[0], key[1], object_id, applied, at)
        self.rows[key] = ManagedObject(key[0], key[1], object_id, applied, at)

    def settle(self, objects: HostObjects) -> None:
        """Rows an earlier, interrupted apply left pending that this one did not touch."""
        for key, row in list(self.rows.items()):
            if row.pending is not None:
                settled = next(resolved({key: row}, objects), None)
                self._put(key, settled.applied if settled else None)

    def drop_stale(self) -> list[Key]:
        """Rows of objects that are gone or were made again by hand (another id)."""
        stale = [
            key for key, row in self.rows.items() if self.ids.get(owner(*key)) != row.object_id
        ]
        if stale:
            self.store.remove_many(stale)
            for key in stale:
                del self.rows[key]
        return stale
