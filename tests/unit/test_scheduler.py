"""The scheduler with a fake clock: fires, misfires, overlap, stagger, outcomes.

The lifecycle is a small fake over a real VMStore (the scheduler's decisions are what is under
test here; tests/integration/test_schedules.py drives real guests)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from stoker.agent import Agent
from stoker.config import AgentConfig
from stoker.domain import cron
from stoker.domain.spec import VMSpec
from stoker.domain.states import VMState
from stoker.domain.vm import VM
from stoker.services import scheduler as sched
from stoker.services.container import Services
from stoker.services.directory import VMDirectory
from stoker.services.errors import Conflict, InvalidSpec, NotFound
from stoker.services.events import EventBus
from stoker.services.reports import ReportGenerator
from stoker.services.scheduler import Scheduler, SchedulerConfig, ScheduleSpec, ScheduleUpdate
from stoker.store.db import Database
from stoker.store.events import EventStore
from stoker.store.schedules import ScheduleStore
from stoker.store.vms import VMStore

BERLIN = "Europe/Berlin"


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def set(self, now: datetime) -> None:
        self.now = now


class FakeLifecycle:
    """start/stop/restart that move the state in a real VMStore and remember the calls."""

    def __init__(
        self, vms: VMStore, clock: FakeClock, data_dir: Path = Path("/nonexistent")
    ) -> None:
        self.vms = vms
        self.directory = VMDirectory(vms, data_dir)
        self.clock = clock
        self.calls: list[tuple[str, str, datetime]] = []
        self.gate: asyncio.Event | None = None  # when set, start waits for it
        self.fail_stop: Exception | None = None

    def get(self, ref: str, transitions: int = 20) -> VM:
        vm = self.vms.get(ref)
        if vm is None:
            raise NotFound(ref)
        return vm

    def _move(self, vm_id: str, to: VMState, reason: str) -> None:
        vm = self.get(vm_id)
        assert self.vms.compare_and_set_state(vm_id, vm.state, to, reason, self.clock())

    async def start(self, ref: str, reason: str = "") -> VM:
        self.calls.append(("start", self.get(ref).name, self.clock()))
        if self.gate is not None:
            await self.gate.wait()
        self._move(ref, VMState.RUNNING, reason)
        return self.get(ref)

    async def stop(self, ref: str, graceful: bool = True, timeout_s=None, reason: str = "") -> VM:
        self.calls.append(("stop", self.get(ref).name, self.clock()))
        if self.fail_stop is not None:
            raise self.fail_stop
        self._move(ref, VMState.STOPPED, "guest shut down gracefully")
        return self.get(ref)

    async def restart(self, ref: str, graceful: bool = True, reason: str = "") -> VM:
        self.calls.append(("restart", self.get(ref).name, self.clock()))
        return self.get(ref)

    async def wait_settled(self, vm_id: str, timeout_s: float) -> VM:
        return self.get(vm_id)


class Snapshots:
    """The snapshot service as the scheduler sees it: ``auto_snapshot(ref)``, scriptable."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.answer: object = None
        self.error: Exception | None = None

    async def auto_snapshot(self, vm_ref: str) -> Any:
        self.calls.append(vm_ref)
        if self.error is not None:
            raise self.error
        return self.answer


class Env:
    def __init__(self, tmp_path: Path, now: datetime, **config: object) -> None:
        self.db = Database(tmp_path / "stoker.db")
        self.clock = FakeClock(now)
        self.vms = VMStore(self.db)
        self.events = EventBus(EventStore(self.db), clock=self.clock)
        self.lifecycle = FakeLifecycle(self.vms, self.clock)
        self.slept: list[float] = []
        self.snapshots = Snapshots()
        self.reports = ReportGenerator(self.db, tmp_path, sched.zone("UTC"), None, clock=self.clock)
        self.scheduler = Scheduler(
            ScheduleStore(self.db),
            self.lifecycle,  # type: ignore[arg-type]
            self.events,
            self.snapshots,
            self.reports,
            SchedulerConfig(**config),  # type: ignore[arg-type]
            "UTC",
            clock=self.clock,
            sleep=self.sleep,
        )

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        await asyncio.sleep(0)

    def add_vm(self, name: str, state: VMState = VMState.STOPPED, **labels: str) -> VM:
        spec = VMSpec(name=name, kernel="/boot/vmlinuz", labels=labels)
        vm = VM(
            id=f"id-{name}",
            name=name,
            spec=spec,
            state=state,
            state_reason="test",
            state_since=self.clock(),
            created_at=self.clock(),
        )
        self.vms.insert(vm)
        return vm

    def event_types(self) -> list[str]:
        return [e.type for e in self.events.store.query(limit=1000)]

    async def tick_at(self, when: datetime) -> None:
        self.clock.set(when)
        await self.scheduler.tick()
        await self.scheduler.wait_idle()


def berlin(*args: int) -> datetime:
    return datetime(*args, tzinfo=sched.zone(BERLIN)).astimezone(UTC)  # type: ignore[misc]


# --------------------------------------------------------------------------- firing


async def test_seed_schedule_fires_on_weekdays_at_0800_local(tmp_path):
    # Friday 2026-03-06, 07:00 in Berlin (CET, UTC+1)
    env = Env(tmp_path, berlin(2026, 3, 6, 7, 0))
    env.add_vm("web-server")
    row = env.scheduler.create(
        ScheduleSpec(vm="web-server", action="start", cron="0 8 * * 1-5", tz=BERLIN)
    )
    assert env.scheduler.next_fire(row) == berlin(2026, 3, 6, 8, 0)

    await env.tick_at(berlin(2026, 3, 6, 7, 59, 59))
    assert env.lifecycle.calls == []
    await env.tick_at(berlin(2026, 3, 6, 8, 0, 1))
    assert [c[:2] for c in env.lifecycle.calls] == [("start", "web-server")]
    [run] = env.scheduler.runs(row.id)
    assert (run.status, run.trigger, run.fire_at) == ("succeeded", "cron", berlin(2026, 3, 6, 8))
    assert run.results[0]["status"] == "succeeded"
    assert env.vms.get("web-server").state == VMState.RUNNING

    # the weekend passes without a fire; Monday 08:00 fires (the VM is running: skipped)
    row = env.scheduler.get(row.id)
    assert env.scheduler.next_fire(row) == berlin(2026, 3, 9, 8, 0)
    await env.tick_at(berlin(2026, 3, 8, 23, 0))
    assert len(env.scheduler.runs(row.id)) == 1
    await env.tick_at(berlin(2026, 3, 9, 8, 0, 2))
    latest = env.scheduler.runs(row.id)[0]
    assert latest.fire_at == berlin(2026, 3, 9, 8)
    assert latest.results[0]["status"] == "skipped"
    assert latest.results[0]["message"] == "already running"
    assert "schedule.ran" in env.event_types()


@pytest.mark.parametrize(
    ("expr", "tz", "after", "expected"),
    [
        # the seed's two examples
        ("0 8 * * 1-5", BERLIN, berlin(2026, 3, 7, 9, 0), berlin(2026, 3, 9, 8, 0)),
        ("0 18 * * *", BERLIN, berlin(2026, 3, 7, 18, 0), berlin(2026, 3, 8, 18, 0)),
        # day-of-month OR day-of-week: the 13th or any Friday
        ("0 0 13 * 5", "UTC", datetime(2026, 3, 7, tzinfo=UTC), datetime(2026, 3, 13, tzinfo=UTC)),
        ("0 0 13 * 5", "UTC", datetime(2026, 2, 7, tzinfo=UTC), datetime(2026, 2, 13, tzinfo=UTC)),
        ("0 0 13 * 1", "UTC", datetime(2026, 2, 7, tzinfo=UTC), datetime(2026, 2, 9, tzinfo=UTC)),
        # spring forward (Berlin 2026-03-29 02:00 -> 03:00): 02:30 runs once at 03:00 CEST
        ("30 2 * * *", BERLIN, berlin(2026, 3, 28, 0), datetime(2026, 3, 28, 1, 30, tzinfo=UTC)),
        ("30 2 * * *", BERLIN, berlin(2026, 3, 29, 0), datetime(2026, 3, 29, 1, 0, tzinfo=UTC)),
        # fall back (2026-10-25 03:00 CEST -> 02:00 CET): 02:30 runs once, the first pass
        ("30 2 * * *", BERLIN, berlin(2026, 10, 25, 0), datetime(2026, 10, 25, 0, 30, tzinfo=UTC)),
        (
            "@daily",
            "UTC",
            datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC),
            datetime(2026, 1, 2, tzinfo=UTC),
        ),
    ],
)
async def test_next_fire_shown_by_the_scheduler(tmp_path, expr, tz, after, expected):
    env = Env(tmp_path, after)
    env.add_vm("web-server")
    row = env.scheduler.create(ScheduleSpec(vm="web-server", action="start", cron=expr, tz=tz))
    assert env.scheduler.next_fire(row) == expected


async def test_fall_back_fires_once(tmp_path):
    env = Env(tmp_path, berlin(2026, 10, 25, 0, 0))
    env.add_vm("web-server")
    row = env.scheduler.create(
        ScheduleSpec(vm="web-server", action="stop", cron="30 2 * * *", tz=BERLIN)
    )
    # walk through the repeated hour in 10-minute steps: one fire only
    t = berlin(2026, 10, 25, 0, 0)
    while t < datetime(2026, 10, 25, 3, 0, tzinfo=UTC):
        t += timedelta(minutes=10)
        await env.tick_at(t)
    assert [r.fire_at for r in env.scheduler.runs(row.id)] == [
        datetime(2026, 10, 25, 0, 30, tzinfo=UTC)
    ]


# ------------------------------------------------------------------------- misfires


async def test_misfire_within_grace_runs_once_on_start(tmp_path):
    env = Env(tmp_path, berlin(2026, 3, 6, 7, 0))
    env.add_vm("web-server")
    row = env.scheduler.create(
        ScheduleSpec(vm="web-server", action="start", cron="0 8 * * 1-5", tz=BERLIN)
    )
    # the agent was down over 08:00 and comes back at 08:09:30 (grace 600 s)
    env.clock.set(berlin(2026, 3, 6, 8, 9, 30))
    await env.scheduler.start()
    await env.scheduler.wait_idle()
    await env.scheduler.stop()
    [run] = env.scheduler.runs(row.id)
    assert run.status == "succeeded" and run.fire_at == berlin(2026, 3, 6, 8)
    assert len(env.lifecycle.calls) == 1


async def test_misfire_beyond_grace_is_recorded_as_missed(tmp_path):
    env = Env(tmp_path, berlin(2026, 3, 6, 7, 0))
    env.add_vm("web-server")
    row = env.scheduler.create(
        ScheduleSpec(vm="web-server", action="start", cron="0 8 * * 1-5", tz=BERLIN)
    )
    await env.tick_at(berlin(2026, 3, 6, 8, 10, 1))  # 601 s late
    [run] = env.scheduler.runs(row.id)
    assert run.status == "missed" and run.fire_at == berlin(2026, 3, 6, 8)
    assert "grace" in run.message
    assert env.lifecycle.calls == []
    assert env.vms.get("web-server").state == VMState.STOPPED
    assert "schedule.missed" in env.event_types()
    # handled: the same fire is not reconsidered
    await env.tick_at(berlin(2026, 3, 6, 9, 0))
    assert len(env.scheduler.runs(row.id)) == 1


async def test_many_fires_missed_latest_within_grace_runs_once(tmp_path):
    env = Env(tmp_path, datetime(2026, 3, 6, 7, 0, tzinfo=UTC), grace_s=120)
    env.add_vm("web-server")
    row = env.scheduler.create(
        ScheduleSpec(vm="web-server", action="stop", cron="*/5 * * * *", tz="UTC")
    )
    env.vms.compare_and_set_state(
        "id-web-server", VMState.STOPPED, VMState.RUNNING, "up", env.clock()
    )
    await env.tick_at(datetime(2026, 3, 6, 8, 1, tzinfo=UTC))  # down 07:00 .. 08:01
    runs = env.scheduler.runs(row.id, limit=100)
    assert [r.status for r in runs].count("succeeded") == 1
    assert [r.status for r in runs].count("missed") == 11  # 07:05 .. 07:55; 08:00 ran
    assert len(env.lifecycle.calls) == 1


async def test_disabled_time_is_not_owed(tmp_path):
    env = Env(tmp_path, datetime(2026, 3, 6, 7, 0, tzinfo=UTC))
    env.add_vm("web-server")
    row = env.scheduler.create(
        ScheduleSpec(vm="web-server", action="start", cron="0 8 * * *", tz="UTC", enabled=False)
    )
    assert env.scheduler.next_fire(row) is None
    await env.tick_at(datetime(2026, 3, 6, 8, 0, 5, tzinfo=UTC))
    env.scheduler.set_enabled(row.id, True)
    await env.tick_at(datetime(2026, 3, 6, 8, 0, 10, tzinfo=UTC))
    assert env.scheduler.runs(row.id) == []
    assert env.scheduler.next_fire(env.scheduler.get(row.id)) == datetime(2026, 3, 7, 8, tzinfo=UTC)


# -------------------------------------------------------------------------- overlap


async def test_no_two_runs_of_one_schedule_at_once(tmp_path):
    env = Env(tmp_path, datetime(2026, 3, 6, 7, 59, tzinfo=UTC))
    env.add_vm("web-server")
    row = env.scheduler.create(
        ScheduleSpec(vm="web-server", action="start", cron="* * * * *", tz="UTC")
    )
    env.lifecycle.gate = asyncio.Event()
    env.clock.set(datetime(2026, 3, 6, 8, 0, 1, tzinfo=UTC))
    await env.scheduler.tick()
    for _ in range(10):
        await asyncio.sleep(0)
    first = env.scheduler.store.running(row.id)
    assert first is not None

    with pytest.raises(Conflict, match="already has run"):
        await env.scheduler.run_now(row.id)
    env.clock.set(datetime(2026, 3, 6, 8, 1, 1, tzinfo=UTC))
    await env.scheduler.tick()  # the next fire arrives while the first run still goes
    statuses = [r.status for r in env.scheduler.runs(row.id)]
    assert statuses == ["skipped", "running"]
    assert len(env.lifecycle.calls) == 1
    with pytest.raises(Conflict, match="running now"):
        env.scheduler.delete(row.id)

    env.lifecycle.gate.set()
    await env.scheduler.wait_idle()
    statuses = [r.status for r in env.scheduler.runs(row.id)]
    assert statuses == ["skipped", "succeeded"]
    assert "schedule.skipped" in env.event_types()
    # the lock is released: run-now works again
    run = await env.scheduler.run_now(row.id)
    await env.scheduler.wait_idle()
    assert env.scheduler.store.run(run.id).status == "succeeded"


async def test_run_left_running_by_a_dead_agent_is_failed_and_unlocked(tmp_path):
    env = Env(tmp_path, datetime(2026, 3, 6, 8, tzinfo=UTC))
    env.add_vm("web-server")
    row = env.scheduler.create(
        ScheduleSpec(vm="web-server", action="start", cron="0 8 * * *", tz="UTC")
    )
    stale = env.scheduler.store.claim(row.id, "manual", env.clock())
    await env.scheduler.start()
    await env.scheduler.stop()
    again = env.scheduler.store.run(stale.id)
    assert again.status == "failed" and "interrupted" in again.message
    assert env.scheduler.store.running(row.id) is None


# -------------------------------------------------------------------------- stagger


async def test_stagger_spreads_starts_deterministically(tmp_path):
    env = Env(tmp_path, datetime(2026, 3, 6, 7, 0, tzinfo=UTC))
    for i in range(6):
        env.add_vm(f"dev-{i}", env="dev")
    env.add_vm("prod", env="prod")
    row = env.scheduler.create(
        ScheduleSpec(selector={"env": "dev"}, action="start", cron="0 8 * * *", spread_s=300)
    )
    await env.tick_at(datetime(2026, 3, 6, 8, 0, 1, tzinfo=UTC))
    [run] = env.scheduler.runs(row.id)
    assert run.status == "succeeded"
    offsets = {r["vm"]: r["offset_s"] for r in run.results}
    assert sorted(offsets) == [f"dev-{i}" for i in range(6)]  # not prod
    assert all(0 <= o < 300 for o in offsets.values())
    assert len(set(offsets.values())) == 6, "every VM gets its own slot"
    assert max(offsets.values()) - min(offsets.values()) > 60, "spread over the window"
    for name, offset in offsets.items():
        assert offset == round(cron.stagger_offset(row.id, f"id-{name}", 300), 3)
    assert sorted(round(s, 3) for s in env.slept) == sorted(offsets.values())

    # the same slots on the next day's run
    for i in range(6):
        env.vms.compare_and_set_state(
            f"id-dev-{i}", VMState.RUNNING, VMState.STOPPED, "t", env.clock()
        )
    await env.tick_at(datetime(2026, 3, 7, 8, 0, 1, tzinfo=UTC))
    again = env.scheduler.runs(row.id)[0]
    assert {r["vm"]: r["offset_s"] for r in again.results} == offsets


# ------------------------------------------------------------------------- outcomes


async def test_failed_action_is_recorded_and_published(tmp_path):
    env = Env(tmp_path, datetime(2026, 3, 6, 17, 0, tzinfo=UTC))
    env.add_vm("web-server", state=VMState.RUNNING)
    env.lifecycle.fail_stop = Conflict("web-server changed state while stopping; retry")
    row = env.scheduler.create(
        ScheduleSpec(vm="web-server", action="stop", cron="0 18 * * *", tz="UTC")
    )
    await env.tick_at(datetime(2026, 3, 6, 18, 0, 1, tzinfo=UTC))
    [run] = env.scheduler.runs(row.id)
    assert run.status == "failed"
    assert "changed state while stopping" in run.message
    failed = env.events.store.query(type="schedule.failed")
    assert len(failed) == 1 and failed[0].vm_id == "id-web-server"
    assert failed[0].data["schedule_id"] == row.id


async def test_snapshot_that_fails_is_a_failed_run_saying_why(tmp_path):
    env = Env(tmp_path, datetime(2026, 3, 6, 1, 0, tzinfo=UTC))
    env.add_vm("web-server", state=VMState.RUNNING)
    env.snapshots.error = Conflict("not enough free space for a snapshot of web-server")
    row = env.scheduler.create(ScheduleSpec(vm="web-server", action="snapshot", cron="@daily"))
    run = await env.scheduler.run_now(row.id)
    await env.scheduler.wait_idle()
    run = env.scheduler.store.run(run.id)
    assert run.status == "failed"
    assert "not enough free space for a snapshot of web-server" in run.message


async def test_snapshot_action_takes_then_prunes(tmp_path):
    """Against the snapshots capability's interface: auto_snapshot(ref) snapshots, then
    prunes by the VM's policy and says what it removed."""
    from types import SimpleNamespace

    env = Env(tmp_path, datetime(2026, 3, 6, 1, 0, tzinfo=UTC))
    env.add_vm("web-server", state=VMState.RUNNING)
    pruned = SimpleNamespace(policy="daily:7,weekly:4", remove=("old1", "old2"))
    env.snapshots.answer = SimpleNamespace(snapshot=SimpleNamespace(id="snap1"), prune=pruned)
    row = env.scheduler.create(ScheduleSpec(vm="web-server", action="snapshot", cron="@daily"))
    run = await env.scheduler.run_now(row.id)
    await env.scheduler.wait_idle()
    run = env.scheduler.store.run(run.id)
    assert env.snapshots.calls == ["id-web-server"]
    assert run.status == "succeeded", run.message
    assert "snapshot snap1 taken; pruned 2 by retention policy daily:7,weekly:4" in run.message


async def test_report_action_writes_the_previous_day(tmp_path):
    env = Env(tmp_path, datetime(2026, 3, 6, 0, 0, tzinfo=UTC))
    row = env.scheduler.create(ScheduleSpec(action="report", cron="5 0 * * *"))
    await env.tick_at(datetime(2026, 3, 6, 0, 5, 3, tzinfo=UTC))
    [run] = env.scheduler.runs(row.id)
    assert run.status == "succeeded", run.message
    assert run.results[0]["report"] == "daily-2026-03-05"
    assert (tmp_path / "reports" / "daily-2026-03-05.txt").is_file()
    assert (tmp_path / "reports" / "daily-2026-03-05.json").is_file()


# ----------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        ({"vm": "nope", "action": "start", "cron": "@daily"}, "vm", "no VM named"),
        ({"action": "start", "cron": "@daily"}, "vm", "exactly one of"),
        ({"vm": "web", "action": "report", "cron": "@daily"}, "vm", "whole node"),
        (
            {"vm": "web", "action": "stop", "cron": "@daily", "options": {"period": "x"}},
            "options",
            "not understood",
        ),
        (
            {"action": "report", "cron": "@daily", "options": {"period": "hourly"}},
            "options.period",
            "daily",
        ),
    ],
)
async def test_bad_schedules_say_what_to_fix(tmp_path, spec, field, words):
    env = Env(tmp_path, datetime(2026, 3, 6, tzinfo=UTC))
    env.add_vm("web")
    with pytest.raises(InvalidSpec) as caught:
        env.scheduler.create(ScheduleSpec(**spec))
    assert caught.value.members["errors"][0]["field"] == field
    assert words in caught.value.detail


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"cron": "0 8 * *"}, "exactly 5"),
        ({"cron": "0 25 * * *"}, "hour field"),
        ({"tz": "Mars/Olympus"}, "unknown time zone"),
        ({"selector": {}}, "at least one label"),
    ],
)
def test_spec_validation(spec, words):
    base = {"vm": "web", "action": "start", "cron": "@daily"}
    with pytest.raises(ValueError, match=words):
        ScheduleSpec(**{**base, **spec})


async def test_update_and_names(tmp_path):
    env = Env(tmp_path, datetime(2026, 3, 6, 7, tzinfo=UTC))
    env.add_vm("web")
    row = env.scheduler.create(
        ScheduleSpec(name="morning", vm="web", action="start", cron="0 8 * * *")
    )
    with pytest.raises(Conflict):
        env.scheduler.create(ScheduleSpec(name="morning", vm="web", action="stop", cron="@daily"))
    env.clock.set(datetime(2026, 3, 6, 7, 30, tzinfo=UTC))
    row = env.scheduler.update("morning", ScheduleUpdate(cron="0 9 * * *"))
    assert row.cron == "0 9 * * *" and row.last_fire_at == env.clock()
    assert env.scheduler.next_fire(row) == datetime(2026, 3, 6, 9, tzinfo=UTC)
    with pytest.raises(InvalidSpec, match="cron"):
        env.scheduler.update("morning", ScheduleUpdate(cron="bad"))
    row = env.scheduler.update("morning", ScheduleUpdate(grace_s=30))
    assert row.grace_s == 30
    # clearing the grace window means the agent's default again, not an error
    row = env.scheduler.update("morning", ScheduleUpdate(grace_s=None))
    assert row.grace_s == env.scheduler.config.grace_s
    env.scheduler.delete("morning")
    with pytest.raises(NotFound):
        env.scheduler.get(row.id)


# ------------------------------------------------------------------------------ loop


async def test_loop_sleeps_until_the_next_fire_with_an_injected_clock(tmp_path):
    """The real loop, with a sleep that moves the fake clock: fires without waiting."""
    env = Env(tmp_path, datetime(2026, 3, 6, 7, 0, tzinfo=UTC), tick_s=3600)
    env.add_vm("web-server")
    row = env.scheduler.create(
        ScheduleSpec(vm="web-server", action="start", cron="0 8 * * *", tz="UTC")
    )

    async def moving_sleep(seconds: float) -> None:
        env.slept.append(seconds)
        if env.scheduler.runs(row.id):
            await asyncio.Event().wait()  # parked after the fire until stop() cancels
        env.clock.set(env.clock() + timedelta(seconds=seconds))
        await asyncio.sleep(0)

    env.scheduler.sleep = moving_sleep
    await env.scheduler.start()
    for _ in range(200):
        await asyncio.sleep(0)
        if env.scheduler.runs(row.id) and not env.scheduler._runs:
            break
    await env.scheduler.stop()
    [run] = env.scheduler.runs(row.id)
    assert run.status == "succeeded" and run.fire_at == datetime(2026, 3, 6, 8, tzinfo=UTC)
    # one sleep of about an hour (to 08:00 plus a hair), not a busy loop
    assert env.slept[0] == pytest.approx(3600.05)
    assert env.lifecycle.calls[0][2] - datetime(2026, 3, 6, 8, tzinfo=UTC) < timedelta(seconds=1)


# --------------------------------------------------------------------------- install


def test_agent_adds_the_daily_report_schedule_once(tmp_path):
    config = AgentConfig(data_dir=tmp_path, sections={"scheduler": {"tz": "UTC"}})
    services = _built(config)
    _built(config)
    rows = services.scheduler.all()
    assert [(r.name, r.action, r.cron, r.options["period"]) for r in rows] == [
        ("daily-report", "report", "5 0 * * *", "daily")
    ]
    assert services.scheduler in services.background

    off = AgentConfig(data_dir=tmp_path, sections={"scheduler": {"default_report": False}})
    _built(off)
    assert not ScheduleStore(Database(tmp_path / "stoker.db")).get("daily-report").enabled


def test_agent_rejects_a_bad_section(tmp_path):
    from stoker.config import ConfigError

    bad = AgentConfig(data_dir=tmp_path, sections={"scheduler": {"grace_s": -1, "x": 1}})
    with pytest.raises(ConfigError, match=r"scheduler\.grace_s"):
        _built(bad)


def _built(config: AgentConfig) -> Services:
    """The agent's own composition, with no hypervisor drivers (nothing is started)."""
    return Agent(config, drivers={}).build()


def test_host_tz_name(tmp_path):
    assert sched.host_tz_name({"TZ": "Europe/Berlin"}, tmp_path) == "Europe/Berlin"
    (tmp_path / "localtime").symlink_to("/usr/share/zoneinfo/America/New_York")
    assert sched.host_tz_name({}, tmp_path) == "America/New_York"
    assert sched.host_tz_name({"TZ": "Nowhere/Land"}, tmp_path / "none") == "UTC"
