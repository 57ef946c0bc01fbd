"""The schedule service: create, change, delete and run schedules on top of the loop.

It resolves targets against the VM list (a schedule stores the VM's name, so it follows a
VM across restarts but not across delete-and-recreate under another name), keeps names
unique, and decides which fires a change forgives: fires of an old timing or of a disabled
schedule are not owed.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from stoker.domain.refs import Candidate
from stoker.domain.schedules import RunRecord, ScheduleRecord
from stoker.services.errors import Conflict, InvalidSpec, NotFound
from stoker.services.events import EventBus
from stoker.services.lifecycle import Lifecycle
from stoker.services.refs import by_prefix
from stoker.services.reports import ReportGenerator
from stoker.services.scheduler.actions import Actions, AutoSnapshots, Clock, Sleep, label
from stoker.services.scheduler.config import SchedulerConfig
from stoker.services.scheduler.loop import ScheduleLoop
from stoker.services.scheduler.spec import ScheduleSpec, ScheduleUpdate, check_options
from stoker.store import schedules as st

DEFAULT_REPORT_NAME = "daily-report"


class Scheduler(ScheduleLoop):
    """The API's entry point to schedules, and one of the agent's background loops."""

    def __init__(
        self,
        store: st.ScheduleStore,
        lifecycle: Lifecycle,
        events: EventBus,
        snapshots: AutoSnapshots,
        reports: ReportGenerator,
        config: SchedulerConfig,
        default_tz: str,
        clock: Clock | None = None,
        sleep: Sleep | None = None,
    ) -> None:
        clock = clock or (lambda: datetime.now(UTC))
        sleep = sleep or asyncio.sleep
        actions = Actions(lifecycle, snapshots, reports, clock, sleep)
        super().__init__(store, events, actions, config, clock, sleep)
        self.lifecycle = lifecycle
        self.reports = reports
        self.default_tz = default_tz

    # ------------------------------------------------------------------------- CRUD

    def create(self, spec: ScheduleSpec) -> ScheduleRecord:
        columns = self._columns(spec)
        now = self.clock()
        row = ScheduleRecord(
            id=uuid.uuid4().hex[:12],
            **columns,
            created_at=now,
            updated_at=now,
            last_fire_at=now,  # fires before creation are not missed, they never were
        )
        self._write(spec, lambda: self.store.insert(row))
        return self.get(row.id)

    def get(self, ref: str) -> ScheduleRecord:
        row = self.store.get(ref)
        if row is None:
            candidates = (Candidate(r.id, r.name or r.action) for r in self.store.all())
            found = by_prefix("schedule", ref, candidates)
            row = None if found is None else self.store.get(found)
        if row is None:
            raise NotFound(f"no schedule named or with id {ref!r}")
        return row

    def all(self) -> list[ScheduleRecord]:
        return self.store.all()

    def update(self, ref: str, changes: ScheduleUpdate) -> ScheduleRecord:
        current = self.get(ref)
        given = changes.model_dump(exclude_unset=True)
        merged = {key: getattr(current, key) for key in ScheduleUpdate.model_fields}
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
        values = self._columns(spec)
        now = self.clock()
        timing_changed = (values["cron"], values["tz"]) != (current.cron, current.tz)
        if timing_changed or (spec.enabled and not current.enabled):
            # fires of the old timing, or while disabled, are not owed
            values["last_fire_at"] = max(now, current.last_fire_at)
        self._write(spec, lambda: self.store.update(current.id, now, **values))
        return self.get(current.id)

    def set_enabled(self, ref: str, enabled: bool) -> ScheduleRecord:
        return self.update(ref, ScheduleUpdate(enabled=enabled))

    def delete(self, ref: str) -> None:
        row = self.get(ref)
        if self.store.running(row.id) is not None:
            raise Conflict(
                f"schedule {label(row)} is running now; wait for it (see its runs) and retry"
            )
        self.store.delete(row.id)
        self.wake()

    def runs(self, ref: str, limit: int = 50) -> list[RunRecord]:
        return self.store.runs(self.get(ref).id, limit)

    def _columns(self, spec: ScheduleSpec) -> dict[str, Any]:
        """The stored form of a spec: target checked, zone, grace and options filled in
        (a grace of null, at create or in an update, means the agent's default)."""
        vm_name = self._resolve_vm(spec)
        return {
            **spec.model_dump(),
            "vm": vm_name,
            "tz": spec.tz or self.default_tz,
            "grace_s": self.config.grace_s if spec.grace_s is None else spec.grace_s,
            "options": check_options(spec.action, spec.options),
        }

    def _resolve_vm(self, spec: ScheduleSpec) -> str | None:
        """Check the target against the action; the VM's name, or None for a selector."""
        if spec.action == "report":
            if spec.vm is not None or spec.selector is not None:
                raise InvalidSpec("vm", "report schedules cover the whole node: give no VM")
            return None
        if (spec.vm is None) == (spec.selector is None):
            raise InvalidSpec(
                "vm", f"a {spec.action} schedule needs exactly one of a VM or a selector"
            )
        if spec.vm is None:
            return None
        vm = self.lifecycle.directory.lookup(spec.vm)
        if vm is None:
            raise InvalidSpec("vm", f"no VM named or with id {spec.vm!r}")
        return vm.name

    def _write(self, spec: ScheduleSpec, write: Callable[[], None]) -> None:
        """Store a change; a taken name is a 409, and the loop re-plans its sleep."""
        try:
            write()
        except sqlite3.IntegrityError:
            raise Conflict(f"a schedule named {spec.name!r} already exists") from None
        self.wake()

    # ------------------------------------------------------------------------ firing

    async def run_now(self, ref: str) -> RunRecord:
        """Start a run at once (cron timing untouched); 409 if one is already going."""
        row = self.get(ref)
        try:
            run = self.store.claim(row.id, "manual", self.clock())
        except st.AlreadyRunning:
            running = self.store.running(row.id)
            raise Conflict(
                f"schedule {label(row)} already has run {running.id if running else '?'} in "
                "progress; two runs of one schedule never overlap"
            ) from None
        self._launch(run, row)
        return run

    # ---------------------------------------------------------------------- defaults

    def ensure_default_report(self) -> None:
        """The built-in daily report schedule: created once, disabled when configured off
        (never deleted, so its run history stays)."""
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
