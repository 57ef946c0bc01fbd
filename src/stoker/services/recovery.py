"""Auto-recovery: the restart policy with backoff, and the watchdogs for stuck states.

The policy is a listener on ``vm.state`` events (plus the health service's "unhealthy"
verdicts), not a special case inside the lifecycle: ``domain.backoff.decide_for`` decides,
this module carries the decision out. A scheduled retry is persisted as ``next_retry_at``
before it is armed, so a restarted agent re-arms it; ``restart_count`` counts the automatic
restarts made in the current run of failures (a stable run, or an operator's start, resets
it). A VM that keeps failing is left in error with reason "restart limit reached ...".

The watchdogs bound each transient state from the moment it was entered (``state_since``):
starting → error, stopping → forced stop, restarting → error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from stoker.domain.backoff import RestartDecision, StopReason, decide_for
from stoker.domain.events import Event, EventType
from stoker.domain.states import IllegalAction, VMState
from stoker.domain.vm import VM
from stoker.services.errors import ServiceError
from stoker.services.events import EventBus
from stoker.services.lifecycle import Lifecycle
from stoker.services.loops import PeriodicTask

log = logging.getLogger("stoker.recovery")

S = VMState
AUTO = "auto-restart"


class WatchdogConfig(BaseModel):
    """``[health]`` keys for the watchdogs (seconds)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    starting_timeout_s: float = Field(default=300.0, gt=0, le=86_400)
    stopping_timeout_s: float = Field(default=120.0, gt=0, le=86_400)
    restarting_timeout_s: float = Field(default=300.0, gt=0, le=86_400)
    watchdog_interval_s: float = Field(default=1.0, gt=0, le=60)
    #: when a VM's own boot/stop timeout is the tighter one, the lifecycle enforces it; the
    #: watchdog steps in only this much later (a backstop, not a race)
    watchdog_grace_s: float = Field(default=5.0, ge=0, le=3600)


class Recovery:
    def __init__(
        self,
        lifecycle: Lifecycle,
        events: EventBus,
        config: WatchdogConfig,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.lifecycle = lifecycle
        self.events = events
        self.config = config
        self.clock = clock or (lambda: datetime.now(UTC))
        self._timers: dict[str, asyncio.Task[None]] = {}
        self._restarting: set[str] = set()  # automatic restarts under way
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watchdog = PeriodicTask("watchdogs", self.check_watchdogs, config.watchdog_interval_s)
        self._acted: dict[str, datetime] = {}  # vm -> state_since the watchdog acted on

    # -------------------------------------------------------------------- policy: events

    def on_event(self, event: Event) -> None:
        """Listener for ``vm.state`` and ``vm.health`` (sync, so "is this our own restart?"
        is read at once)."""
        if event.vm_id is None:
            return
        if event.type == EventType.VM_DELETED:
            self._cancel(event.vm_id)
            return
        if event.type == EventType.VM_HEALTH:
            if event.data.get("to_health") == "unhealthy":
                self.on_unhealthy(event.vm_id, str(event.data.get("reason", "")))
            return
        if event.type != EventType.VM_STATE:
            return
        vm_id = event.vm_id
        before, to = event.data.get("from_state"), event.data.get("to_state")
        ours = vm_id in self._restarting
        if to == S.ERROR and before != S.ERROR:
            self._spawn(self._after_stop(vm_id, "error", str(event.data.get("reason", ""))))
        elif to == S.STOPPED and before == S.RUNNING:
            # the guest powered itself off ("always" restarts it)
            self._spawn(self._after_stop(vm_id, "clean-poweroff", "guest powered off"))
        elif to == S.STOPPED and not ours:
            self._operator_took_over(vm_id, reset=False)  # operator stop or cleanup
        elif to in (S.STARTING, S.RESTARTING) and not ours:
            self._operator_took_over(vm_id, reset=True)  # an operator's start: fresh budget

    def on_unhealthy(self, vm_id: str, reason: str) -> None:
        """A running VM turned unhealthy (the health service's verdict)."""
        self._spawn(self._after_stop(vm_id, "unhealthy", reason))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("recovery task failed: %r", task.exception())

    def _operator_took_over(self, vm_id: str, reset: bool) -> None:
        vm = self.lifecycle.vms.get(vm_id)
        if vm is None:
            return
        had_timer = self._cancel(vm_id)
        if vm.next_retry_at is not None or (reset and vm.restart_count):
            count = 0 if reset else vm.restart_count
            self.lifecycle.vms.set_restart_info(vm_id, count, vm.last_restart_at, None)
        if had_timer or vm.next_retry_at is not None:
            self.events.publish(
                EventType.VM_RESTART_CANCELLED,
                f"{vm.name}: pending automatic restart cancelled (an operator acted)",
                vm_id,
            )

    def _cancel(self, vm_id: str) -> bool:
        timer = self._timers.pop(vm_id, None)
        if timer is not None and timer is not asyncio.current_task():
            timer.cancel()
        return timer is not None

    # ------------------------------------------------------------------ policy: decide

    async def _after_stop(self, vm_id: str, why: StopReason, detail: str) -> None:
        vm = self.lifecycle.vms.get(vm_id, with_transitions=3)
        if vm is None:
            return
        decision = decide_for(vm.spec.restart, why, vm.restart_count, self._last_run_s(vm, why))
        if decision.restart:
            self._schedule(vm, decision, why, detail)
        elif decision.give_up:
            await self._give_up(vm, decision, why, detail)
        elif vm.next_retry_at is not None:
            self.lifecycle.vms.set_restart_info(vm_id, vm.restart_count, vm.last_restart_at, None)

    def _last_run_s(self, vm: VM, why: StopReason) -> float | None:
        """How long the VMM ran before this stop; None if it never reached running."""
        if why == "unhealthy":
            return (
                (self.clock() - vm.state_since).total_seconds() if vm.state == S.RUNNING else None
            )
        recent = vm.transitions
        if len(recent) >= 2 and recent[1].to_state == S.RUNNING:
            return (recent[0].at - recent[1].at).total_seconds()
        return None

    def _schedule(self, vm: VM, decision: RestartDecision, why: str, detail: str) -> None:
        due = self.clock() + timedelta(seconds=decision.delay_s)
        # persisted first: a restarted agent re-arms it
        self.lifecycle.vms.set_restart_info(vm.id, decision.attempt - 1, vm.last_restart_at, due)
        self.events.publish(
            EventType.VM_RESTART_SCHEDULED,
            f"{vm.name}: {decision.reason}: restarting in {decision.delay_s:g} s",
            vm.id,
            attempt=decision.attempt,
            max_retries=vm.spec.restart.max_retries,
            delay_s=decision.delay_s,
            due=due.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            stop_reason=why,
            detail=detail,
        )
        self._arm(vm.id, due, decision.attempt, why)

    async def _give_up(self, vm: VM, decision: RestartDecision, why: str, detail: str) -> None:
        limit = vm.spec.restart.max_retries
        reason = f"restart limit reached ({limit} restarts): {detail or why}"
        self.lifecycle.vms.set_restart_info(vm.id, vm.restart_count, vm.last_restart_at, None)
        self.events.publish(
            EventType.VM_RESTART_LIMIT_REACHED,
            f"{vm.name}: {reason}",
            vm.id,
            restarts=vm.restart_count,
            max_retries=limit,
            stop_reason=why,
        )
        with contextlib.suppress(ServiceError, IllegalAction):
            if vm.state == S.ERROR:
                await self.lifecycle.set_state(vm.id, S.ERROR, reason)
            elif vm.state == S.RUNNING and why == "unhealthy":
                await self.lifecycle.abort(vm.id, reason)

    # ----------------------------------------------------------------- policy: restart

    def _arm(self, vm_id: str, due: datetime, attempt: int, why: str) -> None:
        self._cancel(vm_id)
        self._timers[vm_id] = asyncio.ensure_future(self._fire_at(vm_id, due, attempt, why))

    async def _fire_at(self, vm_id: str, due: datetime, attempt: int, why: str) -> None:
        delay = (due - self.clock()).total_seconds()
        if delay > 0:
            await asyncio.sleep(delay)
        if self._timers.get(vm_id) is asyncio.current_task():
            del self._timers[vm_id]
        await self._restart(vm_id, attempt, why)

    async def _restart(self, vm_id: str, attempt: int, why: str) -> None:
        vm = self.lifecycle.vms.get(vm_id)
        if vm is None or vm.state not in (S.ERROR, S.RUNNING, S.STOPPED):
            return  # deleted, or someone else is already moving it
        limit = vm.spec.restart.max_retries
        reason = f"{AUTO} {attempt} of {limit} after {why}"
        self.lifecycle.vms.set_restart_info(vm_id, attempt, self.clock(), None)
        self.events.publish(
            EventType.VM_AUTO_RESTART,
            f"{vm.name}: {reason}",
            vm_id,
            attempt=attempt,
            stop_reason=why,
        )
        self._restarting.add(vm_id)
        try:
            # graceful=False: an unhealthy VMM may be SIGSTOPped, and a stopped process
            # ignores the ACPI power button
            await self.lifecycle.restart(vm_id, graceful=False, reason=reason)
        except (ServiceError, IllegalAction) as exc:
            self.events.publish(
                EventType.VM_RESTART_FAILED,
                f"{vm.name}: {reason} failed: {exc}",
                vm_id,
                attempt=attempt,
            )
            fresh = self.lifecycle.vms.get(vm_id, with_transitions=3)
            if fresh is not None and fresh.state in (S.ERROR, S.STOPPED):
                # no state change will come to re-decide: count it as a failed attempt
                await self._after_stop(vm_id, "error", str(exc))
        finally:
            self._restarting.discard(vm_id)

    # ---------------------------------------------------------------------- watchdogs

    async def check_watchdogs(self) -> None:
        """One pass: act on every VM that has been in a transient state too long."""
        now = self.clock()
        for vm in self.lifecycle.vms.all():
            limit = self._limit(vm)
            if limit is None:
                continue
            age = (now - vm.state_since).total_seconds()
            if age < limit or self._acted.get(vm.id) == vm.state_since:
                continue
            self._acted[vm.id] = vm.state_since
            reason = f"watchdog: {vm.state.value} for {age:.0f} s (limit {limit:g} s)"
            self.events.publish(
                EventType.VM_WATCHDOG,
                f"{vm.name}: {reason}",
                vm.id,
                state=vm.state.value,
                age_s=round(age, 3),
                limit_s=limit,
            )
            try:
                if vm.state == S.STOPPING:
                    await self.lifecycle.stop(vm.id, graceful=False, reason=reason)
                else:
                    await self.lifecycle.abort(vm.id, reason)
            except (ServiceError, IllegalAction) as exc:
                log.warning("watchdog action failed for %s: %s", vm.name, exc)

    def _limit(self, vm: VM) -> float | None:
        cfg = self.config
        if vm.state == S.STARTING:
            own = vm.spec.boot_timeout_s
            if cfg.starting_timeout_s < own:
                return cfg.starting_timeout_s
            return own + cfg.watchdog_grace_s
        if vm.state == S.STOPPING:
            return max(cfg.stopping_timeout_s, vm.spec.stop_timeout_s + cfg.watchdog_grace_s)
        if vm.state == S.RESTARTING:
            return cfg.restarting_timeout_s
        return None

    # --------------------------------------------------------------------- background

    async def start(self) -> None:
        """Re-arm retries persisted by a previous agent, then start the watchdog loop."""
        for vm in self.lifecycle.vms.all():
            if vm.next_retry_at is not None and vm.id not in self._timers:
                self.events.publish(
                    EventType.VM_RESTART_REARMED,
                    f"{vm.name}: automatic restart re-armed for {vm.next_retry_at:%H:%M:%S} UTC",
                    vm.id,
                    attempt=vm.restart_count + 1,
                )
                self._arm(vm.id, vm.next_retry_at, vm.restart_count + 1, "a failure")
        await self._watchdog.start()

    async def stop(self) -> None:
        await self._watchdog.stop()
        tasks = [*self._timers.values(), *self._tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._timers.clear()

    async def drain(self) -> None:
        """Wait for decisions already under way (tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
