"""What the cluster schedule API does: create-if-absent and delete are etcd transactions
(503 when etcd cannot be reached), reads come from this node's view of the cluster."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from stoker.cluster import keys
from stoker.cluster.errors import unavailable
from stoker.cluster.etcd import Condition, Delete, Etcd, EtcdError, Get
from stoker.cluster.reads import create_once, require_synced, seen
from stoker.cluster.records import ScheduleRecord, ScheduleRunRecord
from stoker.cluster.schedules import last_handled, next_fire
from stoker.cluster.view import ClusterView
from stoker.services.errors import InvalidSpec, NotFound
from stoker.services.scheduler.config import host_tz_name, zone
from stoker.wire.cluster import ClusterScheduleCreate, ClusterScheduleOut, ClusterScheduleRunOut


class ClusterScheduleOps:
    def __init__(
        self,
        etcd: Etcd,
        view: ClusterView,
        node: str,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.etcd = etcd
        self.view = view
        self.node = node
        self.clock = clock or (lambda: datetime.now(UTC))

    def _readable(self) -> None:
        require_synced(self.view)

    async def create(self, request: ClusterScheduleCreate) -> ClusterScheduleOut:
        """Create-if-absent: of concurrent creates of one name, one wins, the others get 409.
        Fires before the creation never count."""
        self._readable()
        tz = request.tz or host_tz_name()
        try:
            zone(tz)
        except ValueError as exc:
            raise InvalidSpec("tz", str(exc)) from None
        if request.vm is not None and self.view.get(keys.vm(request.vm)) is None:
            raise InvalidSpec(
                "vm", f"no cluster VM named {request.vm!r} (`stoker cluster vm list`)"
            )
        record = ScheduleRecord(
            cron=request.cron,
            tz=tz,
            action=request.action,
            vm=request.vm,
            selector=request.selector,
            grace_s=request.grace_s,
            created_by=self.node,
            created_at=self.clock(),
        )
        key = keys.schedule(request.name)
        what = f"a cluster schedule named {request.name!r}"
        await create_once(self.etcd, self.view, key, record, what)
        return self.get(request.name)

    def all(self) -> list[ClusterScheduleOut]:
        self._readable()
        names = self.view.names(keys.SCHEDULES)
        return [out for out in (self._out(n) for n in names) if out is not None]

    def get(self, name: str) -> ClusterScheduleOut:
        self._readable()
        out = self._out(_schedule_name(name))
        if out is None:
            raise NotFound(f"no cluster schedule named {name!r} (`stoker cluster schedule list`)")
        return out

    async def delete(self, name: str) -> None:
        """The schedule and its run record, in one transaction."""
        key = keys.schedule(_schedule_name(name))
        try:
            result = await self.etcd.txn(
                [Condition(key, "create", ">", 0)],
                [Delete(key), Delete(keys.schedule_run(name))],
                [Get(key)],
            )
        except EtcdError as exc:
            raise unavailable(exc) from None
        if not result.succeeded:
            raise NotFound(f"no cluster schedule named {name!r} (`stoker cluster schedule list`)")
        await seen(self.view, result.revision)

    def _out(self, name: str) -> ClusterScheduleOut | None:
        kv = self.view.get(keys.schedule(name))
        record = self.view.record(keys.schedule(name), ScheduleRecord)
        if kv is None or record is None:
            return None
        run = self.view.record(keys.schedule_run(name), ScheduleRunRecord)
        if run is not None and run.schedule_revision != kv.create_revision:
            run = None
        last = last_handled(record, kv.create_revision, run)
        return ClusterScheduleOut(
            name=name,
            cron=record.cron,
            tz=record.tz,
            action=record.action,
            vm=record.vm,
            selector=record.selector,
            grace_s=record.grace_s,
            created_by=record.created_by,
            created_at=record.created_at,
            next_fire_at=next_fire(record, last, self.clock()),
            last_fire_at=run.last_fire_at if run is not None else None,
            last_run=ClusterScheduleRunOut.model_validate(
                run.model_dump(exclude={"schedule_revision", "last_fire_at"})
            )
            if run is not None
            else None,
            revision=self.view.revision,
        )


def _schedule_name(name: str) -> str:
    try:
        return keys.object_name(name, "schedule")
    except ValueError as exc:
        raise NotFound(f"no cluster schedule named {name!r}: {exc}") from None
