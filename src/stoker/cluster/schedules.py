"""Cluster schedules, the pure part: which fire is due, which VMs a run targets, and what the
run writes. The clock is a parameter; ``schedule_runner`` does the I/O.

A fire is handled exactly once in the cluster because "handled" is a fact in etcd, not in a
scheduler's memory: ``schedule-runs/<name>`` holds the latest fire handled, and the leader
advances it in the same transaction as the run's own writes, conditioned on its leadership
and on the run record being the one it read. A new leader therefore starts from what the old
one committed: a fire it committed is not repeated, and a fire it did not commit is still due
(run within ``grace_s``, else recorded as missed, like local schedules).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from stoker.cluster.records import Desired, ScheduleRecord, ScheduleRunRecord, VMRecord
from stoker.domain import cron
from stoker.services.scheduler.config import zone

#: at most this many fires are listed per check (a long outage of "* * * * *")
MAX_FIRES = 50
#: one run is one etcd transaction: etcd allows 128 operations per transaction by default
MAX_TARGETS = 100

DESIRED: dict[str, Desired] = {"start": "running", "stop": "stopped"}


@dataclass(frozen=True)
class Due:
    """What to do about a schedule now."""

    #: the fire to run now (None: nothing within grace)
    run: datetime | None
    #: older fires (or the latest, when beyond grace) to record as missed
    missed: list[datetime]
    #: the latest fire handled once this is committed
    handled_through: datetime


def last_handled(
    schedule: ScheduleRecord, schedule_revision: int, run: ScheduleRunRecord | None
) -> datetime:
    """The latest fire already handled: the run record's, if it belongs to this schedule
    (not to a deleted namesake), else the schedule's creation (earlier fires never count)."""
    if run is not None and run.schedule_revision == schedule_revision:
        return max(run.last_fire_at, schedule.created_at)
    return schedule.created_at


def due(schedule: ScheduleRecord, last: datetime, now: datetime) -> Due | None:
    """The fires in ``(last, now]`` split by ``cron.plan_misfires``; None when none came."""
    fires = cron.missed_fires(schedule.cron, last, now, zone(schedule.tz), limit=MAX_FIRES)
    if not fires:
        return None
    to_run, missed = cron.plan_misfires(fires, now, schedule.grace_s)
    return Due(to_run, missed, fires[-1])


def next_fire(schedule: ScheduleRecord, last: datetime, now: datetime) -> datetime | None:
    """The next fire after both ``now`` and the last fire handled."""
    try:
        return cron.next_fire(schedule.cron, max(last, now), zone(schedule.tz))
    except ValueError:
        return None


def matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def targets(schedule: ScheduleRecord, vms: Mapping[str, VMRecord]) -> list[str]:
    """The cluster VMs the schedule acts on now, by name (a named VM that is gone: none)."""
    if schedule.vm is not None:
        return [schedule.vm] if schedule.vm in vms else []
    selector = schedule.selector or {}
    return sorted(n for n, r in vms.items() if selector and matches(selector, r.spec.labels))


@dataclass(frozen=True)
class RunPlan:
    #: VM name -> its record with the new desired state
    writes: dict[str, VMRecord]
    #: targets already in the desired state
    unchanged: list[str]
    #: targets left out (beyond MAX_TARGETS)
    dropped: list[str]


def plan_run(action: str, names: list[str], vms: Mapping[str, VMRecord]) -> RunPlan:
    """The VM records a run of ``action`` writes. start/stop: the desired state (as the API's
    start/stop). restart: one more restart request, which the VM's node performs once on its
    running copy; a VM whose desired state is stopped is left alone."""
    chosen, dropped = names[:MAX_TARGETS], names[MAX_TARGETS:]
    writes: dict[str, VMRecord] = {}
    unchanged: list[str] = []
    for name in chosen:
        record = vms[name]
        if action == "restart":
            if record.desired != "running":
                unchanged.append(name)
            else:
                writes[name] = record.model_copy(update={"restarts": (record.restarts or 0) + 1})
        elif record.desired == DESIRED[action]:
            unchanged.append(name)
        else:
            writes[name] = record.model_copy(update={"desired": DESIRED[action]})
    return RunPlan(writes, unchanged, dropped)


def describe(action: str, plan: RunPlan) -> str:
    """One line for the run record and the event: what the run changed."""
    past = {"start": "started", "stop": "stopped", "restart": "restarting"}[action]
    parts = []
    if plan.writes:
        parts.append(f"{past} {', '.join(sorted(plan.writes))}")
    if plan.unchanged:
        already = "desired stopped, left alone"
        if action != "restart":
            already = f"already {DESIRED[action]}"
        parts.append(f"{already}: {', '.join(plan.unchanged)}")
    if plan.dropped:
        parts.append(f"{len(plan.dropped)} more left out (at most {MAX_TARGETS} VMs per run)")
    return "; ".join(parts) or "no cluster VM matched"
