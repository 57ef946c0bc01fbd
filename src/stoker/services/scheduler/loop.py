"""When schedules fire: the timing loop, misfire decisions, overlap, and run records.

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
from datetime import datetime

from stoker.domain import cron
from stoker.domain.events import EventType
from stoker.domain.schedules import RunRecord, ScheduleRecord
from stoker.services.events import EventBus
from stoker.services.loops import cancel
from stoker.services.scheduler.actions import Actions, Clock, Result, Sleep, label
from stoker.services.scheduler.config import SchedulerConfig, zone
from stoker.store import schedules as st

log = logging.getLogger("stoker.scheduler")

#: at most this many missed fires are listed per check (a week down with "* * * * *" would
#: otherwise write ten thousand rows); the count in the event says how many there were
MAX_MISSED_ROWS = 50


class ScheduleLoop:
    """The agent's Background for schedules: decides fires and runs them as tasks."""

    def __init__(
        self,
        store: st.ScheduleStore,
        events: EventBus,
        actions: Actions,
        config: SchedulerConfig,
        clock: Clock,
        sleep: Sleep,
    ) -> None:
        self.store = store
        self.events = events
        self.actions = actions
        self.config = config
        self.clock = clock
        self.sleep = sleep
        self._loop_task: asyncio.Task[None] | None = None
        self._runs: dict[int, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()

    # ------------------------------------------------------------------------ timing

    def next_fire(self, row: ScheduleRecord) -> datetime | None:
        """The next fire time in UTC, or None when disabled."""
        if not row.enabled:
            return None
        return _next_after(row, self.clock())

    def seconds_to_next(self) -> float:
        now = self.clock()
        delay = self.config.tick_s
        for row in self.store.all(enabled=True):
            with contextlib.suppress(Exception):
                nxt = _next_after(row, now)
                delay = min(delay, (nxt - now).total_seconds())
        return max(delay, 0.0)

    async def tick(self) -> None:
        """Handle every fire that is due now; used by the loop and driven by tests."""
        now = self.clock()
        for row in self.store.all(enabled=True):
            try:
                self._check(row, now)
            except Exception:  # one bad schedule must not stop the others
                log.exception("checking schedule %s failed", row.id)

    def _check(self, row: ScheduleRecord, now: datetime) -> None:
        fires = cron.missed_fires(
            row.cron, row.last_fire_at, now, zone(row.tz), limit=MAX_MISSED_ROWS
        )
        if not fires:
            return
        to_run, missed = cron.plan_misfires(fires, now, row.grace_s)
        if missed:
            self.events.publish(
                EventType.SCHEDULE_MISSED,
                f"schedule {label(row)}: {len(missed)} fire(s) missed while the agent was "
                f"not running, latest {missed[-1].isoformat()} (beyond the "
                f"{row.grace_s:g} s grace window)",
                self.actions.vm_id(row),
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
                EventType.SCHEDULE_SKIPPED,
                f"schedule {label(row)}: {message}",
                self.actions.vm_id(row),
                schedule_id=row.id,
                fire_at=to_run.isoformat(),
            )
            return
        self._launch(run, row)

    # -------------------------------------------------------------------------- runs

    def _launch(self, run: RunRecord, row: ScheduleRecord) -> None:
        task = asyncio.create_task(self._execute(run, row))
        self._runs[run.id] = task
        task.add_done_callback(lambda _t: self._runs.pop(run.id, None))

    async def _execute(self, run: RunRecord, row: ScheduleRecord) -> None:
        """Perform a claimed run, then release its lock with the outcome and an event."""
        results: list[Result] = []
        try:
            results = await self.actions.perform(row, run)
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
                    EventType.SCHEDULE_FAILED,
                    f"schedule {label(row)} ({row.action}) failed for "
                    f"{r.get('vm', 'the node')}: {r['message']}",
                    r.get("vm_id"),
                    schedule_id=row.id,
                    run_id=run.id,
                    action=row.action,
                )
        else:
            self.events.publish(
                EventType.SCHEDULE_RAN,
                f"schedule {label(row)} ({row.action}) ran: {message}",
                self.actions.vm_id(row),
                schedule_id=row.id,
                run_id=run.id,
                action=row.action,
            )

    async def wait_run(self, run_id: int) -> None:
        """Wait for one run to finish (without cancelling it if the waiter goes away)."""
        task = self._runs.get(run_id)
        if task is not None:
            await asyncio.wait({task})

    async def wait_idle(self) -> None:
        """Wait for the runs started so far (tests, shutdown)."""
        while self._runs:
            await asyncio.gather(*list(self._runs.values()), return_exceptions=True)

    # -------------------------------------------------------------------- background

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
        await cancel(self._loop_task)
        self._loop_task = None
        runs = list(self._runs.values())
        if runs:
            _done, pending = await asyncio.wait(runs, timeout=self.config.stop_grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def wake(self) -> None:
        """Re-plan the sleep now: a schedule was added, changed or removed."""
        self._wake.set()

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


def _next_after(row: ScheduleRecord, now: datetime) -> datetime:
    """The first fire after both ``now`` and the last fire already handled."""
    return cron.next_fire(row.cron, max(row.last_fire_at, now), zone(row.tz))
