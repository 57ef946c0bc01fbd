"""What a run does: the action on each target VM (staggered) or the node report.

Every outcome comes back as a result dict (succeeded, skipped or failed, with a message the
operator can act on) so one VM's failure never stops the others; recording the outcome is
the loop's job.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Protocol

from stoker.domain import cron
from stoker.domain.report import last_complete_day
from stoker.domain.schedules import RunRecord, ScheduleRecord
from stoker.domain.states import IllegalAction, VMState
from stoker.domain.vm import VM
from stoker.services.errors import InvalidSpec, ServiceError
from stoker.services.lifecycle import Lifecycle
from stoker.services.reports import ReportGenerator
from stoker.services.scheduler.config import zone
from stoker.services.snapshots import AutoResult

log = logging.getLogger("stoker.scheduler")

Clock = Callable[[], datetime]
Sleep = Callable[[float], Awaitable[None]]
Result = dict[str, Any]


class AutoSnapshots(Protocol):
    async def auto_snapshot(self, vm_ref: str) -> AutoResult:
        """An automatic snapshot now, then pruning by the VM's retention policy."""


def label(row: ScheduleRecord) -> str:
    """How messages name a schedule: its name and id, or the id alone."""
    return f"{row.name} ({row.id})" if row.name else row.id


class Actions:
    def __init__(
        self,
        lifecycle: Lifecycle,
        snapshots: AutoSnapshots,
        reports: ReportGenerator,
        clock: Clock,
        sleep: Sleep,
    ) -> None:
        self.lifecycle = lifecycle
        self.snapshots = snapshots
        self.reports = reports
        self.clock = clock
        self.sleep = sleep

    async def perform(self, row: ScheduleRecord, run: RunRecord) -> list[Result]:
        """One result per target VM, or the report's; empty when no VM matched."""
        if row.action == "report":
            return [await self._report(row, run)]
        targets = self.targets(row)
        if isinstance(targets, str):
            return [{"status": "failed", "message": targets}]
        return list(await asyncio.gather(*(self._one(row, vm) for vm in targets)))

    def targets(self, row: ScheduleRecord) -> list[VM] | str:
        """The VMs the schedule covers now, or why its named VM is gone."""
        if row.vm is not None:
            vm = self.lifecycle.directory.find(row.vm)
            return [vm] if vm is not None else f"no VM named {row.vm!r} (deleted?)"
        selector = row.selector or {}
        return [
            vm
            for vm in self.lifecycle.directory.all()
            if all(vm.spec.labels.get(k) == v for k, v in selector.items())
        ]

    def vm_id(self, row: ScheduleRecord) -> str | None:
        """The id of the schedule's named VM, for events (None for selectors and reports)."""
        if row.vm is None:
            return None
        vm = self.lifecycle.directory.find(row.vm)
        return vm.id if vm else None

    async def _one(self, row: ScheduleRecord, vm: VM) -> Result:
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

    async def _act(self, row: ScheduleRecord, vm: VM) -> tuple[str, str]:
        """Do the action to one VM: (succeeded|skipped|failed, what happened)."""
        why = f"schedule {label(row)}"
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
        """An automatic snapshot, which then prunes by the VM's retention policy."""
        result = await self.snapshots.auto_snapshot(vm.id)
        message = f"snapshot {result.snapshot.id} taken"
        if result.prune is None:
            message += "; no retention policy, nothing pruned"
        else:
            pruned = result.prune
            message += f"; pruned {len(pruned.remove)} by retention policy {pruned.policy}"
        return "succeeded", message

    async def _report(self, row: ScheduleRecord, run: RunRecord) -> Result:
        """The last complete period as of the fire time (a daily report fired just after
        midnight covers yesterday)."""
        period = row.options.get("period", "daily")
        when = run.fire_at or self.clock()
        day = last_complete_day(period, when, zone(row.tz))
        try:
            doc = await self.reports.generate(period, day)
        except ServiceError as exc:
            return {"status": "failed", "message": str(exc)}
        return {"status": "succeeded", "message": f"wrote {doc['label']}", "report": doc["label"]}
