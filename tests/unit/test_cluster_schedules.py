"""Cluster schedules: when a fire is due (clock injected), what a run writes, and that a
leader change in the middle neither repeats nor drops a run.

The runner is driven against a small in-memory stand-in for etcd that evaluates the
transactions' conditions the way etcd does (create/mod revisions), and a view that can lag
behind it, as a new leader's view can; the real thing is in
tests/integration/test_cluster_schedules.py.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from stoker.cluster import keys
from stoker.cluster.decide import Do, Facts, Local, decide, needs_report
from stoker.cluster.etcd import Condition, Delete, Get, KeyValue, Put, TxnResult
from stoker.cluster.reconciler import Reconciler
from stoker.cluster.records import (
    OwnerRecord,
    PlacementRecord,
    ScheduleRecord,
    ScheduleRunRecord,
    StatusRecord,
    VMRecord,
)
from stoker.cluster.schedule_runner import ScheduleRunner
from stoker.cluster.schedules import (
    MAX_TARGETS,
    describe,
    due,
    last_handled,
    next_fire,
    plan_run,
    targets,
)
from stoker.domain.spec import VMSpec
from stoker.domain.states import VMState as S

T0 = datetime(2026, 11, 30, 7, 0, tzinfo=UTC)


def schedule(cron: str = "0 8 * * *", grace_s: float = 600, **kw: Any) -> ScheduleRecord:
    fields: dict[str, Any] = {
        "cron": cron,
        "tz": "UTC",
        "action": "stop",
        "selector": {"team": "web"},
        "grace_s": grace_s,
        "created_by": "n1",
        "created_at": T0,
        **kw,
    }
    return ScheduleRecord.model_validate(fields)


def vm(name: str, desired: str = "running", **labels: str) -> VMRecord:
    return VMRecord.model_validate(
        {
            "spec": VMSpec(name=name, kernel="/k", labels=labels),
            "desired": desired,
            "created_by": "n1",
            "created_at": T0,
        }
    )


def at(hour: int, minute: int = 0, second: int = 0) -> datetime:
    return T0.replace(hour=hour, minute=minute, second=second)


# -- when a fire is due --------------------------------------------------------------------------


def test_nothing_is_due_before_the_fire_time() -> None:
    assert due(schedule(), T0, at(7, 59, 59)) is None


def test_the_fire_is_due_at_its_time() -> None:
    d = due(schedule(), T0, at(8, 0, 1))
    assert d is not None
    assert d.run == at(8) and d.missed == [] and d.handled_through == at(8)


def test_a_late_fire_within_grace_runs() -> None:
    d = due(schedule(grace_s=600), T0, at(8, 9, 59))
    assert d is not None and d.run == at(8)


def test_a_fire_beyond_grace_is_recorded_as_missed() -> None:
    d = due(schedule(grace_s=600), T0, at(8, 10, 1))
    assert d is not None
    assert d.run is None and d.missed == [at(8)] and d.handled_through == at(8)


def test_only_the_latest_of_several_fires_runs_the_older_are_missed() -> None:
    d = due(schedule("*/20 * * * *", grace_s=60), at(7, 59), at(9, 0, 30))
    assert d is not None
    assert d.run == at(9)
    assert d.missed == [at(8), at(8, 20), at(8, 40)]


def test_fires_before_the_schedule_was_created_never_count() -> None:
    s = schedule("* * * * *")
    assert last_handled(s, 5, None) == T0
    d = due(s, last_handled(s, 5, None), T0 + timedelta(seconds=30))
    assert d is None


def test_a_run_record_of_a_deleted_namesake_is_ignored() -> None:
    s = schedule()
    old = run_record(revision=3, last=at(23))
    assert last_handled(s, 9, old) == T0
    assert last_handled(s, 3, old) == at(23)


def test_time_zones_and_dst_follow_the_local_schedules() -> None:
    """Europe/Berlin springs forward at 02:00 on 2026-03-29: a 02:30 job runs once, at 03:00
    CEST (01:00 UTC), as in Debian cron and local schedules."""
    s = schedule("30 2 * * *", tz="Europe/Berlin", created_at=datetime(2026, 3, 28, tzinfo=UTC))
    nxt = next_fire(s, datetime(2026, 3, 28, 12, tzinfo=UTC), datetime(2026, 3, 28, 12, tzinfo=UTC))
    assert nxt == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)
    d = due(s, datetime(2026, 3, 28, 12, tzinfo=UTC), datetime(2026, 3, 29, 1, 0, 5, tzinfo=UTC))
    assert d is not None and d.run == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)


def test_aliases_are_their_five_field_form() -> None:
    assert schedule("@daily").cron == "0 0 * * *"


@pytest.mark.parametrize("bad", ["0 8 * *", "@reboot", "61 * * * *", "0 0 L * *"])
def test_a_bad_cron_is_refused_by_the_record(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid cron expression"):
        schedule(bad)


def test_an_unknown_zone_is_refused_by_the_record() -> None:
    with pytest.raises(ValueError, match="unknown time zone"):
        schedule(tz="Mars/Olympus")


# -- what a run does -----------------------------------------------------------------------------


def test_targets_by_name_or_selector() -> None:
    vms = {"a": vm("a", team="web"), "b": vm("b", team="db"), "c": vm("c", team="web")}
    assert targets(schedule(), vms) == ["a", "c"]
    assert targets(schedule(vm="b", selector=None), vms) == ["b"]
    assert targets(schedule(vm="gone", selector=None), vms) == []


def test_a_run_writes_only_the_vms_not_yet_in_the_desired_state() -> None:
    vms = {"a": vm("a"), "b": vm("b", desired="stopped")}
    plan = plan_run("stop", ["a", "b"], vms)
    assert {n: r.desired for n, r in plan.writes.items()} == {"a": "stopped"}
    assert plan.unchanged == ["b"]
    assert describe("stop", plan) == "stopped a; already stopped: b"
    start = plan_run("start", ["a", "b"], vms)
    assert list(start.writes) == ["b"] and start.unchanged == ["a"]


def test_a_restart_run_adds_one_request_to_running_vms_only() -> None:
    vms = {"a": vm("a"), "b": vm("b", desired="stopped"), "c": vm("c")}
    vms["c"] = vms["c"].model_copy(update={"restarts": 4})
    plan = plan_run("restart", ["a", "b", "c"], vms)
    assert {n: r.restarts for n, r in plan.writes.items()} == {"a": 1, "c": 5}
    assert all(r.desired == "running" for r in plan.writes.values())
    assert plan.unchanged == ["b"]
    assert describe("restart", plan) == "restarting a, c; desired stopped, left alone: b"


def test_a_run_is_bounded_to_one_transaction() -> None:
    names = [f"v{i:03d}" for i in range(MAX_TARGETS + 5)]
    plan = plan_run("stop", names, {n: vm(n) for n in names})
    assert len(plan.writes) == MAX_TARGETS and len(plan.dropped) == 5
    assert "5 more left out" in describe("stop", plan)


# -- the runner, leader changes --------------------------------------------------------------------


@dataclass
class MemoryEtcd:
    """Keys with etcd's revisions, and transactions evaluated as etcd does."""

    kvs: dict[str, KeyValue] = field(default_factory=dict)
    revision: int = 1

    def put(self, key: str, value: bytes) -> None:
        self.revision += 1
        old = self.kvs.get(key)
        created = old.create_revision if old else self.revision
        version = old.version + 1 if old else 1
        self.kvs[key] = KeyValue(key, value, created, self.revision, version, 0)

    def _holds(self, c: Condition) -> bool:
        kv = self.kvs.get(c.key)
        actual = (
            0 if kv is None else {"create": kv.create_revision, "mod": kv.mod_revision}[c.target]
        )
        assert isinstance(c.value, int)
        return {"==": actual == c.value, ">": actual > c.value}[c.op]

    async def txn(
        self,
        when: Sequence[Condition],
        then: Sequence[Put | Delete | Get],
        otherwise: Sequence[Put | Delete | Get] = (),
        *,
        timeout: float | None = None,
    ) -> TxnResult:
        ok = all(self._holds(c) for c in when)
        for op in then if ok else otherwise:
            if isinstance(op, Put):
                self.put(op.key, op.value)
            elif isinstance(op, Delete):
                self.kvs.pop(op.key, None)
        return TxnResult(ok, self.revision, {})


class FrozenView:
    """What a node's view holds: a copy of etcd at some revision (``refresh`` to catch up)."""

    def __init__(self, etcd: MemoryEtcd) -> None:
        self.etcd = etcd
        self.kvs: dict[str, KeyValue] = {}
        self.refresh()

    def refresh(self) -> None:
        self.kvs = dict(self.etcd.kvs)

    def get(self, key: str) -> KeyValue | None:
        return self.kvs.get(key)

    def record(self, key: str, model: type[Any]) -> Any:
        kv = self.kvs.get(key)
        return None if kv is None else model.model_validate_json(kv.value)

    def records(self, prefix: str, model: type[Any]) -> dict[str, tuple[KeyValue, Any]]:
        return {
            k[len(prefix) :]: (kv, model.model_validate_json(kv.value))
            for k, kv in self.kvs.items()
            if k.startswith(prefix) and "/" not in k[len(prefix) :]
        }


class Leadership:
    def __init__(self, etcd: MemoryEtcd, node: str) -> None:
        self.key = f"/stoker/election/scheduler/{node}"
        etcd.put(self.key, b"{}")
        self.revision = etcd.kvs[self.key].create_revision

    def leadership(self) -> Condition:
        return Condition(self.key, "create", "==", self.revision)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def run_record(revision: int, last: datetime) -> ScheduleRunRecord:
    return ScheduleRunRecord.model_validate(
        {
            "schedule_revision": revision,
            "last_fire_at": last,
            "fire_at": last,
            "action": "stop",
            "outcome": "ok",
            "message": "m",
            "node": "n1",
            "at": last,
        }
    )


@dataclass
class Cluster:
    etcd: MemoryEtcd
    clock: Clock

    def runner(self, node: str) -> tuple[ScheduleRunner, FrozenView, Leadership]:
        view = FrozenView(self.etcd)
        runner = ScheduleRunner(self.etcd, view, node, clock=self.clock)  # type: ignore[arg-type]
        return runner, view, Leadership(self.etcd, node)

    def desired(self, name: str) -> str:
        return json.loads(self.etcd.kvs[keys.vm(name)].value)["desired"]  # type: ignore[no-any-return]

    def run(self, name: str = "nightly") -> ScheduleRunRecord:
        return ScheduleRunRecord.model_validate_json(self.etcd.kvs[keys.schedule_run(name)].value)


@pytest.fixture
def cluster() -> Cluster:
    etcd = MemoryEtcd()
    etcd.put(keys.vm("web-1"), vm("web-1", team="web").dump())
    etcd.put(keys.vm("db-1"), vm("db-1", team="db").dump())
    etcd.put(keys.schedule("nightly"), schedule().dump())
    return Cluster(etcd, Clock(at(7, 59)))


async def test_the_leader_runs_a_due_fire_once(cluster: Cluster) -> None:
    runner, view, lead = cluster.runner("n1")
    assert await runner.tick(lead) == 0  # 07:59: not due
    cluster.clock.now = at(8, 0, 1)
    assert await runner.tick(lead) > 0
    assert cluster.desired("web-1") == "stopped" and cluster.desired("db-1") == "running"
    run = cluster.run()
    assert (run.outcome, run.fire_at, run.vms, run.changed) == ("ok", at(8), ["web-1"], ["web-1"])
    assert run.node == "n1" and run.message == "stopped web-1"
    revision = cluster.etcd.revision
    assert await runner.tick(lead) == 0  # its view is stale: the condition refuses
    view.refresh()
    assert await runner.tick(lead) == 0  # up to date: nothing is due any more
    assert cluster.etcd.revision == revision


async def test_a_new_leader_does_not_repeat_a_committed_run(cluster: Cluster) -> None:
    old, _, old_lead = cluster.runner("n1")
    new, new_view, new_lead = cluster.runner("n2")  # its view read before the run
    cluster.clock.now = at(8, 0, 1)
    assert await old.tick(old_lead) > 0
    cluster.etcd.kvs.pop(old_lead.key)  # n1's lease expired: n2 leads, on a stale view
    cluster.etcd.put(keys.vm("web-1"), vm("web-1", team="web").dump())  # an operator starts it
    revision = cluster.etcd.revision
    assert await new.tick(new_lead) == 0  # stale view: the run record moved, nothing written
    new_view.refresh()
    assert await new.tick(new_lead) == 0  # the 08:00 fire is handled already
    assert cluster.etcd.revision == revision
    assert cluster.desired("web-1") == "running"


async def test_a_run_the_old_leader_did_not_commit_is_run_by_the_next(cluster: Cluster) -> None:
    old, _, old_lead = cluster.runner("n1")
    new, _, new_lead = cluster.runner("n2")
    cluster.etcd.kvs.pop(old_lead.key)  # n1 lost its lease just before the fire
    cluster.clock.now = at(8, 0, 1)
    assert await old.tick(old_lead) == 0  # fenced: a deposed leader writes nothing
    assert keys.schedule_run("nightly") not in cluster.etcd.kvs
    assert cluster.desired("web-1") == "running"
    cluster.clock.now = at(8, 0, 6)  # n2 takes over a few seconds later
    assert await new.tick(new_lead) > 0
    assert cluster.desired("web-1") == "stopped"
    assert cluster.run().node == "n2" and cluster.run().fire_at == at(8)


async def test_a_takeover_beyond_grace_records_the_fire_as_missed(cluster: Cluster) -> None:
    new, _, lead = cluster.runner("n2")
    cluster.clock.now = at(8, 10, 30)
    assert await new.tick(lead) > 0
    run = cluster.run()
    assert (run.outcome, run.missed, run.changed) == ("missed", 1, [])
    assert "grace" in run.message
    assert cluster.desired("web-1") == "running"


async def test_a_vm_changed_under_the_run_makes_it_retry_not_half_apply(cluster: Cluster) -> None:
    runner, view, lead = cluster.runner("n1")
    cluster.etcd.put(keys.vm("web-1"), vm("web-1", team="web").dump())  # after the view read
    cluster.clock.now = at(8, 0, 1)
    assert await runner.tick(lead) == 0
    assert keys.schedule_run("nightly") not in cluster.etcd.kvs
    view.refresh()
    assert await runner.tick(lead) > 0
    assert cluster.desired("web-1") == "stopped"


async def test_a_schedule_without_targets_records_that(cluster: Cluster) -> None:
    cluster.etcd.put(keys.schedule("nightly"), schedule(selector={"team": "none"}).dump())
    runner, _, lead = cluster.runner("n1")
    cluster.clock.now = at(8, 0, 1)
    assert await runner.tick(lead) > 0
    assert cluster.run().outcome == "no-targets"
    assert cluster.run().message == "no cluster VM matched"


async def test_a_restart_schedule_requests_a_restart_of_the_running_target(
    cluster: Cluster,
) -> None:
    cluster.etcd.put(keys.schedule("nightly"), schedule(action="restart").dump())
    runner, _, lead = cluster.runner("n1")
    cluster.clock.now = at(8, 0, 1)
    assert await runner.tick(lead) > 0
    stored = VMRecord.model_validate_json(cluster.etcd.kvs[keys.vm("web-1")].value)
    assert stored.restarts == 1 and stored.desired == "running"
    assert cluster.run().changed == ["web-1"]


# -- the node performs a restart request once ----------------------------------------------------

LEASE = 0xA1


def facts(restarts: int | None, done: int | None, state: S = S.RUNNING, **kw: Any) -> Facts:
    record = vm("web").model_copy(update={"restarts": restarts})
    fields: dict[str, Any] = {
        "me": "me",
        "lease": LEASE,
        "may_run": True,
        "incarnation": 7,
        "record": record,
        "placement": PlacementRecord(
            node="me", incarnation=7, summary="x", decided_by="n1", decided_at=T0
        ),
        "owner": OwnerRecord(node="me", lease=LEASE, incarnation=7, since=T0),
        "status": None,
        "local": Local(state=state, reason="r", incarnation=7),
        "restarts_done": done,
        **kw,
    }
    return Facts(**fields)


def steps(f: Facts) -> list[Do]:
    return [step.do for step in decide(f).steps]


def test_a_running_copy_restarts_once_per_request() -> None:
    assert steps(facts(restarts=2, done=1)) == [Do.RESTART_REQUESTED]
    assert steps(facts(restarts=2, done=2)) == []
    assert steps(facts(restarts=None, done=0)) == []
    assert steps(facts(restarts=2, done=None)) == []


def test_a_stopped_or_foreign_copy_is_not_restarted_for_a_request() -> None:
    assert steps(facts(restarts=2, done=1, state=S.STOPPED)) == [Do.START]
    assert steps(facts(restarts=2, done=1, state=S.STARTING)) == []
    other = OwnerRecord(node="other", lease=7, incarnation=7, since=T0)
    assert Do.RESTART_REQUESTED not in steps(facts(restarts=2, done=1, owner=other))
    assert steps(facts(restarts=2, done=1, may_run=False)) == []


def test_what_was_satisfied_is_reported() -> None:
    status = StatusRecord(
        node="me", incarnation=7, state=S.RUNNING, reason="r", since=T0, reported_at=T0
    )
    assert needs_report(facts(1, 1, status=status), S.RUNNING, "r")
    assert not needs_report(
        facts(1, 1, status=status.model_copy(update={"restarts": 1})), S.RUNNING, "r"
    )
    assert not needs_report(facts(None, 0, status=status), S.RUNNING, "r")


def reconciler() -> Reconciler:
    session = SimpleNamespace(cfg=SimpleNamespace(node_name="me"))
    return Reconciler(None, None, session, None, None, None)  # type: ignore[arg-type]


def test_the_node_remembers_what_it_satisfied_across_agent_restarts() -> None:
    record = vm("web").model_copy(update={"restarts": 3})
    mine = StatusRecord(
        node="me", incarnation=7, state=S.RUNNING, reason="r", since=T0, reported_at=T0,
        restarts=2,
    )  # fmt: skip
    # an agent that restarted: its last report says 2 were done, so one is still to do
    assert reconciler()._restarts_done("web", 7, record, mine) == 2
    # a copy new on this node (the status is another node's): nothing to repeat
    theirs = mine.model_copy(update={"node": "other"})
    assert reconciler()._restarts_done("web", 7, record, theirs) == 3
    assert reconciler()._restarts_done("web", 7, record, None) == 3
    # a new incarnation starts from its own record
    fresh = reconciler()
    assert fresh._restarts_done("web", 7, record, mine) == 2
    assert fresh._restarts_done("web", 8, vm("web"), None) == 0
