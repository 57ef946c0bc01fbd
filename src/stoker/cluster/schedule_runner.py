"""Cluster schedules, the leader's part: on every scheduler pass, handle each due fire with one
etcd transaction (the rules are in ``schedules``).

The transaction holds the whole run: the target VM records' new desired state (each
conditioned on the revision it was read at, like the API's start/stop), the advanced run
record (conditioned on the one read), the schedule still being the one read, and the
leadership condition. Nothing half-done is possible: if anything moved, nothing is written and
the next pass (about a second later, on a newer view) decides again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

from stoker.cluster import keys
from stoker.cluster.etcd import Condition, Etcd, EtcdError, Put, absent, same_incarnation, unchanged
from stoker.cluster.records import ScheduleRecord, ScheduleRunRecord, VMRecord
from stoker.cluster.schedules import Due, describe, due, last_handled, plan_run, targets
from stoker.cluster.view import ClusterView
from stoker.domain.events import EventType
from stoker.services.events import EventBus

log = logging.getLogger("stoker.cluster")


class Leading(Protocol):
    """What the runner needs of the scheduler's election: the condition that fences writes."""

    def leadership(self) -> Condition: ...


class ScheduleRunner:
    def __init__(
        self,
        etcd: Etcd,
        view: ClusterView,
        node: str,
        events: EventBus | None = None,
        timeout_s: float = 2.0,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.etcd = etcd
        self.view = view
        self.node = node
        self.events = events
        self.timeout_s = timeout_s
        self.clock = clock or (lambda: datetime.now(UTC))

    async def tick(self, election: Leading) -> int:
        """Handle every due fire; returns the revision of the last write (0: none). Errors
        are logged, never raised: schedules must not stop the placements."""
        now = self.clock()
        last = 0
        for name, (kv, schedule) in sorted(
            self.view.records(keys.SCHEDULES, ScheduleRecord).items()
        ):
            try:
                last = max(
                    last, await self._check(election, name, kv.create_revision, schedule, now)
                )
            except EtcdError as exc:
                log.info("cluster schedule %s: %s; trying again on the next pass", name, exc)
                break
            except Exception:
                log.exception("cluster schedule %s failed", name)
        return last

    async def _check(
        self, election: Leading, name: str, revision: int, schedule: ScheduleRecord, now: datetime
    ) -> int:
        run_key = keys.schedule_run(name)
        run_kv = self.view.get(run_key)
        run = self.view.record(run_key, ScheduleRunRecord)
        todo = due(schedule, last_handled(schedule, revision, run), now)
        if todo is None:
            return 0
        conditions = [
            election.leadership(),
            same_incarnation(keys.schedule(name), revision),
            absent(run_key) if run_kv is None else unchanged(run_key, run_kv.mod_revision),
        ]
        if todo.run is None:
            record = self._record(revision, schedule, todo, "missed", [], [], "")
            return await self._commit(name, schedule, todo, record, conditions, [])
        vms = {n: rec for n, (_, rec) in self.view.records(keys.VMS, VMRecord).items()}
        chosen = targets(schedule, vms)
        plan = plan_run(schedule.action, chosen, vms)
        puts = []
        for vm, updated in plan.writes.items():
            vm_kv = self.view.get(keys.vm(vm))
            assert vm_kv is not None  # it is in the view's records
            conditions.append(unchanged(keys.vm(vm), vm_kv.mod_revision))
            puts.append(Put(keys.vm(vm), updated.dump()))
        outcome = "ok" if chosen else "no-targets"
        record = self._record(
            revision,
            schedule,
            todo,
            outcome,
            chosen,
            sorted(plan.writes),
            describe(schedule.action, plan),
        )
        return await self._commit(name, schedule, todo, record, conditions, puts)

    def _record(
        self,
        revision: int,
        schedule: ScheduleRecord,
        todo: Due,
        outcome: str,
        chosen: list[str],
        changed: list[str],
        message: str,
    ) -> ScheduleRunRecord:
        if todo.run is None:
            message = (
                f"{len(todo.missed)} fire(s) missed, latest {todo.missed[-1].isoformat()} "
                f"(more than the {schedule.grace_s:g} s grace late)"
            )
        elif todo.missed:
            message += f"; {len(todo.missed)} earlier fire(s) missed"
        return ScheduleRunRecord.model_validate(
            {
                "schedule_revision": revision,
                "last_fire_at": todo.handled_through,
                "fire_at": todo.run or todo.missed[-1],
                "action": schedule.action,
                "outcome": outcome,
                "vms": chosen[:128],
                "changed": changed[:128],
                "missed": len(todo.missed),
                "message": message[:2000],
                "node": self.node,
                "at": self.clock(),
            }
        )

    async def _commit(
        self,
        name: str,
        schedule: ScheduleRecord,
        todo: Due,
        record: ScheduleRunRecord,
        conditions: list[Condition],
        puts: list[Put],
    ) -> int:
        ops = [*puts, Put(keys.schedule_run(name), record.dump())]
        result = await self.etcd.txn(conditions, ops, timeout=self.timeout_s)
        if not result.succeeded:
            return 0  # something moved under the decision: decide again on a newer view
        log.info("cluster schedule %s: %s", name, record.message)
        if self.events is not None:
            kind = EventType.SCHEDULE_MISSED if todo.run is None else EventType.SCHEDULE_RAN
            self.events.publish(
                kind,
                f"cluster schedule {name} ({schedule.action}): {record.message}",
                None,
                schedule=name,
                fire_at=record.fire_at.isoformat(),
                vms=record.vms,
                changed=record.changed,
                outcome=record.outcome,
            )
        return result.revision
