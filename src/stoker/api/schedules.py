"""/api/v1/schedules and /api/v1/reports."""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Response, status
from pydantic import BaseModel
from pydantic.dataclasses import dataclass as pydantic_dataclass

from stoker.api.deps import services
from stoker.api.problems import PROBLEM_RESPONSES
from stoker.domain.schedules import RunRecord, ScheduleRecord
from stoker.services.container import Services
from stoker.services.errors import Conflict
from stoker.services.reports import ReportGenerator
from stoker.services.scheduler import Scheduler, ScheduleSpec, ScheduleUpdate, zone

router = APIRouter(responses=PROBLEM_RESPONSES)

Svc = Annotated[Services, Depends(services)]


def _scheduler(svc: Services) -> Scheduler:
    scheduler = svc.extra.get("scheduler")
    if scheduler is None:
        raise Conflict("the scheduler is not installed on this agent")
    return scheduler  # type: ignore[no-any-return]


def _reports(svc: Services) -> ReportGenerator:
    reports = svc.extra.get("reports")
    if reports is None:
        raise Conflict("reports are not installed on this agent")
    return reports  # type: ignore[no-any-return]


# The stored rows as the API shows them: the columns are declared once, in the store.
@pydantic_dataclass(frozen=True)
class RunOut(RunRecord):
    @classmethod
    def of(cls, run: RunRecord) -> RunOut:
        return cls(**run.__dict__)


@pydantic_dataclass(frozen=True)
class ScheduleOut(ScheduleRecord):
    next_fire_at: datetime | None
    next_fire_local: str | None
    running_run_id: int | None
    last_run: RunOut | None

    @classmethod
    def of(cls, row: ScheduleRecord, scheduler: Scheduler) -> ScheduleOut:
        nxt = scheduler.next_fire(row)
        running = scheduler.store.running(row.id)
        last = scheduler.store.runs(row.id, limit=1)
        return cls(
            **row.__dict__,
            next_fire_at=nxt,
            next_fire_local=nxt.astimezone(zone(row.tz)).isoformat() if nxt else None,
            running_run_id=running.id if running else None,
            last_run=RunOut.of(last[0]) if last else None,
        )


class ReportSummary(BaseModel):
    label: str
    period: str | None
    start: str | None
    end: str | None
    generated_at: str | None
    partial: bool
    text_path: str
    json_path: str


class ReportOut(BaseModel):
    label: str
    report: dict[str, Any]
    text: str


# ------------------------------------------------------------------------------ schedules


@router.post(
    "/api/v1/schedules",
    status_code=status.HTTP_201_CREATED,
    tags=["schedules"],
)
async def create_schedule(spec: ScheduleSpec, svc: Svc) -> ScheduleOut:
    """Create a schedule: an action (start, stop, restart, snapshot, report) on a VM or a
    label selector at cron times in a time zone, optionally staggered over ``spread_s``."""
    scheduler = _scheduler(svc)
    return ScheduleOut.of(scheduler.create(spec), scheduler)


@router.get("/api/v1/schedules", tags=["schedules"])
async def list_schedules(svc: Svc) -> list[ScheduleOut]:
    scheduler = _scheduler(svc)
    return [ScheduleOut.of(row, scheduler) for row in scheduler.all()]


@router.get("/api/v1/schedules/{ref}", tags=["schedules"])
async def get_schedule(ref: str, svc: Svc) -> ScheduleOut:
    scheduler = _scheduler(svc)
    return ScheduleOut.of(scheduler.get(ref), scheduler)


@router.patch("/api/v1/schedules/{ref}", tags=["schedules"])
async def update_schedule(ref: str, changes: ScheduleUpdate, svc: Svc) -> ScheduleOut:
    """Change some fields; a new cron or zone counts fires from now on."""
    scheduler = _scheduler(svc)
    return ScheduleOut.of(scheduler.update(ref, changes), scheduler)


@router.delete(
    "/api/v1/schedules/{ref}", status_code=status.HTTP_204_NO_CONTENT, tags=["schedules"]
)
async def delete_schedule(ref: str, svc: Svc) -> Response:
    _scheduler(svc).delete(ref)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/api/v1/schedules/{ref}/enable", tags=["schedules"])
async def enable_schedule(ref: str, svc: Svc) -> ScheduleOut:
    scheduler = _scheduler(svc)
    return ScheduleOut.of(scheduler.set_enabled(ref, True), scheduler)


@router.post("/api/v1/schedules/{ref}/disable", tags=["schedules"])
async def disable_schedule(ref: str, svc: Svc) -> ScheduleOut:
    scheduler = _scheduler(svc)
    return ScheduleOut.of(scheduler.set_enabled(ref, False), scheduler)


@router.post(
    "/api/v1/schedules/{ref}/run",
    status_code=status.HTTP_202_ACCEPTED,
    tags=["schedules"],
)
async def run_schedule(
    ref: str,
    svc: Svc,
    wait: Annotated[bool, Query(description="answer when the run has finished")] = False,
) -> RunOut:
    """Run now, outside the cron timing; 409 while a run of this schedule is in progress."""
    scheduler = _scheduler(svc)
    run = await scheduler.run_now(ref)
    if wait:
        await scheduler.wait_run(run.id)
        run = scheduler.store.run(run.id) or run
    return RunOut.of(run)


@router.get("/api/v1/schedules/{ref}/runs", tags=["schedules"])
async def schedule_runs(
    ref: str, svc: Svc, limit: Annotated[int, Query(ge=1, le=1000)] = 50
) -> list[RunOut]:
    """Newest first: cron fires, manual runs, missed and skipped fires, with outcomes."""
    return [RunOut.of(run) for run in _scheduler(svc).runs(ref, limit)]


# -------------------------------------------------------------------------------- reports


@router.get("/api/v1/reports", tags=["reports"])
async def list_reports(svc: Svc) -> list[ReportSummary]:
    return [ReportSummary(**r) for r in _reports(svc).all()]


@router.get("/api/v1/reports/{label}", tags=["reports"])
async def get_report(label: str, svc: Svc) -> ReportOut:
    """One report by its file name stem, e.g. ``daily-2026-03-02``, ``weekly-2026-W09``."""
    doc, text = _reports(svc).get(label)
    return ReportOut(label=label, report=doc, text=text)


@router.post(
    "/api/v1/reports/{period}",
    status_code=status.HTTP_201_CREATED,
    tags=["reports"],
)
async def generate_report(
    period: str,
    svc: Svc,
    day: Annotated[
        date | None,
        Query(alias="date", description="a day in the period (YYYY-MM-DD); default today"),
    ] = None,
) -> ReportOut:
    """Generate (or regenerate) the daily, weekly or monthly report now and write it under
    ``<data_dir>/reports/``."""
    reports = _reports(svc)
    doc = await reports.generate(period, day)
    _, text = reports.get(doc["label"])
    return ReportOut(label=doc["label"], report=doc, text=text)
