"""Cron-like schedules of VM operations (start, stop, restart, snapshot) and reports.

One loop wakes at the next fire time of any enabled schedule (or every ``tick_s``), lists the
fires that came due since the schedule's ``last_fire_at`` and lets ``domain.cron`` decide:
the latest fire runs if it is at most ``grace_s`` late, older ones are recorded as missed
(the agent was down). A run row is the lock: a fire that arrives while a run of the same
schedule is still going is recorded as skipped, never started twice. The clock and the sleep
are parameters so tests move time without waiting for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from stoker.config import AgentConfig, ConfigError
from stoker.domain import cron
from stoker.domain.report import PERIODS, last_complete_day
from stoker.domain.spec import LABEL_KEY_RE, NAME_PATTERN
from stoker.domain.states import IllegalAction, VMState
from stoker.domain.vm import VM
from stoker.services.container import Services
from stoker.services.errors import Conflict, InvalidSpec, NotFound, ServiceError
from stoker.services.events import EventBus
from stoker.services.lifecycle import Lifecycle
from stoker.services.reports import ReportGenerator
from stoker.store import schedules as st
from stoker.store.db import Database

log = logging.getLogger("stoker.scheduler")

Action = Literal["start", "stop", "restart", "snapshot", "report"]
VM_ACTIONS = ("start", "stop", "restart", "snapshot")
DEFAULT_REPORT_NAME = "daily-report"
#: at most this many missed fires are listed per check (a week down with "* * * * *" would
#: otherwise write ten thousand rows); the count in the event says how many there were
MAX_MISSED_ROWS = 50

Clock = Callable[[], datetime]
Sleep = Callable[[float], Awaitable[None]]


# ------------------------------------------------------------------------------- config


class SchedulerConfig(BaseModel):
    """The ``[scheduler]`` section of the agent config."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    tz: str | None = Field(default=None, description="default zone; default: the host's")
    grace_s: float = Field(default=600.0, ge=0, le=7 * 86400)
    tick_s: float = Field(default=30.0, gt=0, le=3600, description="longest sleep between checks")
    default_report: bool = Field(default=True, description="install the daily report schedule")
    report_cron: str = "5 0 * * *"
    stop_grace_s: float = Field(
        default=10.0, ge=0, le=600, description="how long running actions may finish at stop"
    )

    @field_validator("tz")
    @classmethod
    def _tz(cls, v: str | None) -> str | None:
        if v is not None:
            zone(v)
        return v

    @field_validator("report_cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        cron.validate_cron(v)
        return v


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {name!r}; use an IANA name like Europe/Berlin"
        ) from None


def host_tz_name(environ: dict[str, str] | None = None, etc: Path = Path("/etc")) -> str:
    """The host's IANA zone: $TZ, the /etc/localtime link, /etc/timezone, else UTC.

    A name, not ``datetime.now().astimezone().tzinfo``: that is a fixed offset, which would
    move every 08:00 schedule by an hour at the next DST change.
    """
    env = os.environ if environ is None else environ
    candidates = [env.get("TZ", "").lstrip(":")]
    with contextlib.suppress(OSError):
        target = os.readlink(etc / "localtime")
        if "zoneinfo/" in target:
            candidates.append(target.split("zoneinfo/", 1)[1])
    with contextlib.suppress(OSError):
        candidates.append((etc / "timezone").read_text().strip())
    for name in candidates:
        if name:
            with contextlib.suppress(ValueError):
                zone(name)
                return name
    return "UTC"


# ------------------------------------------------------------------------------ inputs


class ScheduleSpec(BaseModel):
    """What an operator asks for; checks needing the VM list are in ``Scheduler``."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, pattern=NAME_PATTERN)
    action: Action
    vm: str | None = Field(default=None, description="a VM name or id")
    selector: dict[str, str] | None = Field(
        default=None, description="label selector: every VM with all these labels"
    )
    cron: str = Field(description="5-field cron expression or @hourly/@daily/...")
    tz: str | None = Field(default=None, description="IANA zone; default: the agent's")
    spread_s: float = Field(default=0.0, ge=0, le=86400, description="stagger window")
    grace_s: float | None = Field(default=None, ge=0, le=7 * 86400)
    enabled: bool = True
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="report: {'period': daily|weekly|monthly}; stop/restart: "
        "{'graceful': bool, 'timeout_s': seconds}",
    )

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        cron.validate_cron(v)
        return " ".join(v.split())

    @field_validator("tz")
    @classmethod
    def _tz(cls, v: str | None) -> str | None:
        if v is not None:
            zone(v)
        return v

    @field_validator("selector")
    @classmethod
    def _selector(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None and not v:
            raise ValueError("give at least one label, or target a VM instead")
        for key in v or {}:
            if not LABEL_KEY_RE.match(key):
                raise ValueError(f"label key {key!r} must match {LABEL_KEY_RE.pattern}")
        return v


class ScheduleUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, pattern=NAME_PATTERN)
    action: Action | None = None
    vm: str | None = None
    selector: dict[str, str] | None = None
    cron: str | None = None
    tz: str | None = None
    spread_s: float | None = Field(default=None, ge=0, le=86400)
    grace_s: float | None = Field(default=None, ge=0, le=7 * 86400)
    enabled: bool | None = None
    options: dict[str, Any] | None = None


def _check_options(action: str, options: dict[str, Any]) -> dict[str, Any]:
    allowed: dict[str, set[str]] = {
        "start": set(),
        "stop": {"graceful", "timeout_s"},
        "restart": {"graceful"},
        "snapshot": set(),
        "report": {"period"},
    }
    unknown = set(options) - allowed[action]
    if unknown:
        known = ", ".join(sorted(allowed[action])) or "none"
        raise InvalidSpec(
            "options", f"{', '.join(sorted(unknown))} not understood by {action} (known: {known})"
        )
    out = dict(options)
    if action == "report":
        period = out.setdefault("period", "daily")
        if period not in PERIODS:
            raise InvalidSpec("options.period", f"{period!r} is not one of {', '.join(PERIODS)}")
    if "graceful" in out and not isinstance(out["graceful"], bool):
        raise InvalidSpec("options.graceful", "must be true or false")
    if "timeout_s" in out:
        t = out["timeout_s"]
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t <= 86400:
            raise InvalidSpec("options.timeout_s", "must be a number of seconds in (0, 86400]")
    return out


# ----------------------------------------------------------------------------- service


class Scheduler:
    def __init__(
        self,
        store: st.ScheduleStore,
        lifecycle: Lifecycle,
        events: EventBus,
        extra: dict[str, Any],
        reports: ReportGenerator,
        config: SchedulerConfig,
        default_tz: str,
        clock: Clock | None = None,
        sleep: Sleep | None = None,
    ) -> None:
        self.store = store
        self.lifecycle = lifecycle
        self.events = events
        self.extra = extra
        self.reports = reports
        self.config = config
        self.default_tz = default_tz
        self.clock: Clock = clock or (lambda: datetime.now(UTC))
        self.sleep: Sleep = sleep or asyncio.sleep
        self._loop_task: asyncio.Task[None] | None = None
        self._runs: dict[int, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()

    # ------------------------------------------------------------------------- CRUD

    def _resolve(self, spec: ScheduleSpec) -> tuple[str | None, dict[str, str] | None, str]:
        """Check the target against the action; returns (vm name, selector, zone name)."""
        if spec.action == "report":
            if spec.vm is not None or spec.selector is not None:
                raise InvalidSpec("vm", "report schedules cover the whole node: give no VM")
            vm_name = None
        else:
            if (spec.vm is None) == (spec.selector is None):
                raise InvalidSpec(
                    "vm", f"a {spec.action} schedule needs exactly one of a VM or a selector"
                )
            vm_name = None
            if spec.vm is not None:
                vm = self.lifecycle.vms.get(spec.vm)
                if vm is None:
                    raise InvalidSpec("vm", f"no VM named or with id {spec.vm!r}")
                vm_name = vm.name
        return vm_name, spec.selector, spec.tz or self.default_tz

    def create(self, spec: ScheduleSpec) -> st.ScheduleRow:
        vm_name, selector, tz = self._resolve(spec)
        options = _check_options(spec.action, spec.options)
        now = self.clock()
        row = st.ScheduleRow(
            id=uuid.uuid4().hex[:12],
            name=spec.name,
            action=spec.action,
            vm=vm_name,
            selector=selector,
            cron=spec.cron,
            tz=tz,
            spread_s=spec.spread_s,
            grace_s=self.config.grace_s if spec.grace_s is None else spec.grace_s,
            options=options,
            enabled=spec.enabled,
            created_at=now,
            updated_at=now,
            last_fire_at=now,  # fires before creation are not missed, they never were
        )
        try:
            self.store.insert(row)
        except sqlite3.IntegrityError:
            raise Conflict(f"a schedule named {spec.name!r} already exists") from None
        self._wake.set()
        return self.get(row.id)

    def get(self, ref: str) -> st.ScheduleRow:
        row = self.store.get(ref)
        if row is None:
            raise NotFound(f"no schedule named or with id {ref!r}")
        return row

    def list(self) -> list[st.ScheduleRow]:
        return self.store.list()

    def update(self, ref: str, changes: ScheduleUpdate) -> st.ScheduleRow:
        current = self.get(ref)
        given = changes.model_dump(exclude_unset=True)
        merged = {
            "name": current.name,
            "action": current.action,
            "vm": current.vm,
            "selector": current.selector,
            "cron": current.cron,
            "tz": current.tz,
            "spread_s": current.spread_s,
            "grace_s": current.grace_s,
            "enabled": current.enabled,
            "options": current.options,
        }
        if "vm" in given and given["vm"] is not None:
            merged["selector"] = None
        if "selector" in given and given["selector"] is not None:
            merged["vm"] = None
        if "action" in given and "options" not in given:
            merged["options"] = {}
        merged.update(given)
        try:
            spec = ScheduleSpec.model_validate(merged)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "body"
            raise InvalidSpec(field, first["msg"].removeprefix("Value error, ")) from None
        vm_name, selector, tz = self._resolve(spec)
        options = _check_options(spec.action, spec.options)
        now = self.clock()
        values: dict[str, Any] = {
            "name": spec.name,
            "action": spec.action,
            "vm": vm_name,
            "selector": selector,
            "cron": spec.cron,
            "tz": tz,
            "spread_s": spec.spread_s,
            "grace_s": spec.grace_s,
            "enabled": spec.enabled,
            "options": options,
        }
        timing_changed = (spec.cron, tz) != (current.cron, current.tz)
        if timing_changed or (spec.enabled and not current.enabled):
            # fires of the old timing, or while disabled, are not owed
            values["last_fire_at"] = max(now, current.last_fire_at)
        try:
            self.store.update(current.id, now, **values)
        except sqlite3.IntegrityError:
            raise Conflict(f"a schedule named {spec.name!r} already exists") from None
        self._wake.set()
        return self.get(current.id)

    def set_enabled(self, ref: str, enabled: bool) -> st.ScheduleRow:
        return self.update(ref, ScheduleUpdate(enabled=enabled))

    def delete(self, ref: str) -> None:
        row = self.get(ref)
        if self.store.running(row.id) is not None:
            raise Conflict(
                f"schedule {_label(row)} is running now; wait for it (see its runs) and retry"
            )
        self.store.delete(row.id)
        self._wake.set()

    def runs(self, ref: str, limit: int = 50) -> list[st.RunRow]:
        return self.store.runs(self.get(ref).id, limit)

    def next_fire(self, row: st.ScheduleRow) -> datetime | None:
        """The next fire time in UTC, or None when disabled."""
        if not row.enabled:
            return None
        return cron.next_fire(row.cron, max(row.last_fire_at, self.clock()), zone(row.tz))

    # ------------------------------------------------------------------------- firing

    async def run_now(self, ref: str) -> st.RunRow:
        """Start a run at once (cron timing untouched); 409 if one is already going."""
        row = self.get(ref)
        try:
            run = self.store.claim(row.id, "manual", self.clock())
        except st.AlreadyRunning:
            running = self.store.running(row.id)
            raise Conflict(
                f"schedule {_label(row)} already has run {running.id if running else '?'} in "
                "progress; two runs of one schedule never overlap"
            ) from None
        self._launch(run, row)
        return run

    async def tick(self) -> None:
        """Handle every fire that is due now; used by the loop and driven by tests."""
        now = self.clock()
        for row in self.store.list(enabled=True):
            try:
                self._check(row, now)
            except Exception:  # one bad schedule must not stop the others
                log.exception("checking schedule %s failed", row.id)

    def _check(self, row: st.ScheduleRow, now: datetime) -> None:
        fires = cron.missed_fires(
            row.cron, row.last_fire_at, now, zone(row.tz), limit=MAX_MISSED_ROWS
        )
        if not fires:
            return
        to_run, missed = cron.plan_misfires(fires, now, row.grace_s)
        if missed:
            self.events.publish(
                "schedule.missed",
                f"schedule {_label(row)}: {len(missed)} fire(s) missed while the agent was "
                f"not running, latest {missed[-1].isoformat()} (beyond the "
                f"{row.grace_s:g} s grace window)",
                self._vm_id(row),
                schedule_id=row.id,
                missed=[m.isoformat() for m in missed],
            )
        if to_run is None:
            self.store.record_missed(row.id, missed, now)
            return
        try:
            run = self.store.claim(row.id, "cron", now, fire_at=to_run, missed=missed)
        except st.AlreadyRunning:
            message = "skipped: the previous run of this schedule is still in progress"
            self.store.record(row.id, st.SKIPPED, now, message, fire_at=to_run, missed=missed)
            self.events.publish(
                "schedule.skipped", f"schedule {_label(row)}: {message}", self._vm_id(row),
                schedule_id=row.id, fire_at=to_run.isoformat(),
            )  # fmt: skip
            return
        self._launch(run, row)

    def _vm_id(self, row: st.ScheduleRow) -> str | None:
        if row.vm is None:
            return None
        vm = self.lifecycle.vms.get(row.vm)
        return vm.id if vm else None

    def _launch(self, run: st.RunRow, row: st.ScheduleRow) -> None:
        task = asyncio.create_task(self._execute(run, row))
        self._runs[run.id] = task
        task.add_done_callback(lambda _t: self._runs.pop(run.id, None))

    async def _execute(self, run: st.RunRow, row: st.ScheduleRow) -> None:
        results: list[dict[str, Any]] = []
        try:
            if row.action == "report":
                results = [await self._report(row, run)]
            else:
                targets = self._targets(row)
                if isinstance(targets, str):
                    results = [{"status": "failed", "message": targets}]
                else:
                    results = list(await asyncio.gather(*(self._one(row, vm) for vm in targets)))
        except asyncio.CancelledError:
            self.store.finish(
                run.id, st.FAILED, self.clock(), "interrupted: the agent stopped", results
            )
            raise
        except Exception as exc:  # a bug in one run is that run's failure, not the loop's
            log.exception("schedule run failed")
            results.append({"status": "failed", "message": f"{type(exc).__name__}: {exc}"})
        failed = [r for r in results if r["status"] == "failed"]
        if not results:
            status, message = st.SUCCEEDED, "no VM matched the selector"
        elif failed:
            status = st.FAILED
            message = "; ".join(f"{r.get('vm', 'report')}: {r['message']}" for r in failed)
        else:
            status = st.SUCCEEDED
            message = "; ".join(f"{r.get('vm', 'report')}: {r['message']}" for r in results)
        self.store.finish(run.id, status, self.clock(), message, results)
        if failed:
            for r in failed:
                self.events.publish(
                    "schedule.failed",
                    f"schedule {_label(row)} ({row.action}) failed for "
                    f"{r.get('vm', 'the node')}: {r['message']}",
                    r.get("vm_id"),
                    schedule_id=row.id,
                    run_id=run.id,
                    action=row.action,
                )
        else:
            self.events.publish(
                "schedule.ran",
                f"schedule {_label(row)} ({row.action}) ran: {message}",
                self._vm_id(row),
                schedule_id=row.id,
                run_id=run.id,
                action=row.action,
            )

    def _targets(self, row: st.ScheduleRow) -> list[VM] | str:
        if row.vm is not None:
            vm = self.lifecycle.vms.get(row.vm)
            return [vm] if vm is not None else f"no VM named {row.vm!r} (deleted?)"
        selector = row.selector or {}
        return [
            vm
            for vm in self.lifecycle.vms.list()
            if all(vm.spec.labels.get(k) == v for k, v in selector.items())
        ]

    async def _one(self, row: st.ScheduleRow, vm: VM) -> dict[str, Any]:
        offset = cron.stagger_offset(row.id, vm.id, row.spread_s)
        if offset > 0:
            await self.sleep(offset)
        started = self.clock()
        try:
            outcome, message = await self._act(row, vm)
        except (ServiceError, IllegalAction) as exc:
            outcome, message = "failed", str(exc)
        except Exception as exc:
            log.exception("scheduled %s of %s failed", row.action, vm.name)
            outcome, message = "failed", f"{type(exc).__name__}: {exc}"
        return {
            "vm": vm.name,
            "vm_id": vm.id,
            "status": outcome,
            "message": message,
            "offset_s": round(offset, 3),
            "started_at": started.isoformat(),
            "finished_at": self.clock().isoformat(),
        }

    async def _act(self, row: st.ScheduleRow, vm: VM) -> tuple[str, str]:
        """Do the action to one VM: (succeeded|skipped|failed, what happened)."""
        why = f"schedule {_label(row)}"
        lc = self.lifecycle
        state = lc.get(vm.id, 0).state
        if row.action == "start":
            if state in (VMState.RUNNING, VMState.STARTING, VMState.RESTARTING):
                return "skipped", f"already {state.value}"
            await lc.start(vm.id, reason=f"started by {why}")
            done = await lc.wait_settled(vm.id, vm.spec.boot_timeout_s + 10)
            if done.state == VMState.RUNNING:
                return "succeeded", "started"
            return "failed", f"did not come up: {done.state.value}: {done.state_reason}"
        if row.action == "stop":
            if state in (VMState.STOPPED, VMState.PENDING):
                return "skipped", f"already {state.value}"
            graceful = bool(row.options.get("graceful", True))
            done = await lc.stop(
                vm.id,
                graceful=graceful,
                timeout_s=row.options.get("timeout_s"),
                reason=f"{'graceful' if graceful else 'forced'} stop by {why}",
            )
            if done.state == VMState.STOPPED:
                return "succeeded", f"stopped ({done.state_reason})"
            return "failed", f"still {done.state.value}: {done.state_reason}"
        if row.action == "restart":
            graceful = bool(row.options.get("graceful", True))
            await lc.restart(vm.id, graceful=graceful, reason=f"restarted by {why}")
            done = await lc.wait_settled(vm.id, vm.spec.boot_timeout_s + 10)
            if done.state == VMState.RUNNING:
                return "succeeded", "restarted"
            return "failed", f"did not come back: {done.state.value}: {done.state_reason}"
        if row.action == "snapshot":
            return await self._snapshot(vm)
        raise InvalidSpec("action", f"unknown action {row.action!r}")  # pragma: no cover

    async def _snapshot(self, vm: VM) -> tuple[str, str]:
        """The snapshots capability's automatic snapshot, which then prunes by the VM's
        retention policy (``SnapshotService.auto_snapshot``)."""
        service = self.extra.get("snapshots")
        take = getattr(service, "auto_snapshot", None)
        if take is None:
            return "failed", "the snapshots capability is not available on this agent"
        result = await _maybe_await(take(vm.id))
        snap = getattr(result, "snapshot", result)
        message = f"snapshot {_describe(snap)} taken"
        pruned = getattr(result, "prune", None)
        if pruned is None:
            message += "; no retention policy, nothing pruned"
        else:
            removed = getattr(pruned, "remove", ())
            policy = getattr(pruned, "policy", "?")
            message += f"; pruned {len(removed)} by retention policy {policy}"
        return "succeeded", message

    async def _report(self, row: st.ScheduleRow, run: st.RunRow) -> dict[str, Any]:
        period = row.options.get("period", "daily")
        when = run.fire_at or self.clock()
        day = last_complete_day(period, when, zone(row.tz))
        try:
            doc = await self.reports.generate(period, day)
        except ServiceError as exc:
            return {"status": "failed", "message": str(exc)}
        return {"status": "succeeded", "message": f"wrote {doc['label']}", "report": doc["label"]}

    # ------------------------------------------------------------------------- loop

    async def start(self) -> None:
        interrupted = self.store.fail_interrupted(
            self.clock(), "interrupted: the agent stopped during the run"
        )
        if interrupted:
            log.warning("%d schedule run(s) were interrupted by the last agent stop", interrupted)
        # fires missed while the agent was down are decided now, before anything else waits
        await self.tick()
        self._loop_task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        runs = list(self._runs.values())
        if runs:
            _done, pending = await asyncio.wait(runs, timeout=self.config.stop_grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def wait_run(self, run_id: int) -> None:
        """Wait for one run to finish (without cancelling it if the waiter goes away)."""
        task = self._runs.get(run_id)
        if task is not None:
            await asyncio.wait({task})

    async def wait_idle(self) -> None:
        """Wait for the runs started so far (tests, shutdown)."""
        while self._runs:
            await asyncio.gather(*list(self._runs.values()), return_exceptions=True)

    def seconds_to_next(self) -> float:
        now = self.clock()
        delay = self.config.tick_s
        for row in self.store.list(enabled=True):
            with contextlib.suppress(Exception):
                nxt = cron.next_fire(row.cron, max(row.last_fire_at, now), zone(row.tz))
                delay = min(delay, (nxt - now).total_seconds())
        return max(delay, 0.0)

    async def _loop(self) -> None:
        """Sleep until the next fire (or a change to the schedules), then check."""
        while True:
            self._wake.clear()
            delay = self.seconds_to_next()
            # a hair past the fire time, so the check sees it as due
            sleeper = asyncio.ensure_future(self.sleep(delay + 0.05))
            waker = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pending in (sleeper, waker):
                    pending.cancel()
                await asyncio.gather(sleeper, waker, return_exceptions=True)
            try:
                await self.tick()
            except Exception:
                log.exception("scheduler tick failed")

    # -------------------------------------------------------------------- defaults

    def ensure_default_report(self) -> None:
        existing = self.store.get(DEFAULT_REPORT_NAME)
        if not self.config.default_report:
            if existing is not None and existing.options.get("builtin") and existing.enabled:
                self.store.update(existing.id, self.clock(), enabled=False)
            return
        if existing is not None:
            return
        spec = ScheduleSpec(
            name=DEFAULT_REPORT_NAME,
            action="report",
            cron=self.config.report_cron,
            options={"period": "daily"},
        )
        row = self.create(spec)
        self.store.update(row.id, self.clock(), options={"period": "daily", "builtin": True})


def _label(row: st.ScheduleRow) -> str:
    return f"{row.name} ({row.id})" if row.name else row.id


def _describe(value: Any) -> str:
    for attr in ("name", "id"):
        if isinstance(value, dict) and attr in value:
            return str(value[attr])
        if hasattr(value, attr):
            return str(getattr(value, attr))
    return "" if value is None else str(value)


async def _maybe_await(value: Any) -> Any:
    if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
        return await value
    return value


def load_config(config: AgentConfig) -> SchedulerConfig:
    try:
        return SchedulerConfig.model_validate(config.sections.get("scheduler", {}))
    except ValidationError as exc:
        problems = "; ".join(
            f"scheduler.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from None


def install(services: Services, config: AgentConfig, db: Database) -> None:
    """Register ``services.extra['scheduler']`` and ``['reports']``; add the schedule loop."""
    cfg = load_config(config)
    tz_name = cfg.tz or host_tz_name()
    resources = services.extra.get("resources")
    samples = getattr(resources, "store", None)
    predict = getattr(resources, "predict", None)
    clock = services.lifecycle.clock
    reports = ReportGenerator(
        db,
        config.data_dir,
        zone(tz_name),
        samples,
        predictor=(lambda: predict(clock().timestamp())) if predict else None,
        clock=clock,
    )
    scheduler = Scheduler(
        st.ScheduleStore(db),
        services.lifecycle,
        services.events,
        services.extra,
        reports,
        cfg,
        tz_name,
        clock=clock,
    )
    services.extra["reports"] = reports
    services.extra["scheduler"] = scheduler
    if cfg.enabled:
        scheduler.ensure_default_report()
        services.background.append(scheduler)
