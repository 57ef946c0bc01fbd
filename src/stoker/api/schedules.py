"""/api/v1/schedules and /api/v1/reports."""

from __future__ import annotations

from datetime import date
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response, status

from stoker.api.deps import services
from stoker.api.problems import PROBLEM_RESPONSES
from stoker.api.shapes import run_out, schedule_out
from stoker.services.container import Services
from stoker.services.scheduler import ScheduleSpec, ScheduleUpdate
from stoker.wire import ReportOut, ReportSummary, RunOut, ScheduleOut

router = APIRouter(responses=PROBLEM_RESPONSES)

Svc = Annotated[Services, Depends(services)]


# ------------------------------------------------------------------------------ schedules


@router.post(
    "/api/v1/schedules",
    status_code=status.HTTP_201_CREATED,
    tags=["schedules"],
)
async def create_schedule(spec: ScheduleSpec, svc: Svc) -> ScheduleOut:
    """Create a schedule: an action (start, stop, restart, snapshot, report) on a VM or a
    label selector at cron times in a time zone, optionally staggered over ``spread_s``."""
    scheduler = svc.scheduler
    return schedule_out(scheduler.create(spec), scheduler)


@router.get("/api/v1/schedules", tags=["schedules"])
async def list_schedules(svc: Svc) -> list[ScheduleOut]:
    scheduler = svc.scheduler
    return [schedule_out(row, scheduler) for row in scheduler.all()]


@router.get("/api/v1/schedules/{ref}", tags=["schedules"])
async def get_schedule(ref: str, svc: Svc) -> ScheduleOut:
    scheduler = svc.scheduler
    return schedule_out(scheduler.get(ref), scheduler)


@router.patch("/api/v1/schedules/{ref}", tags=["schedules"])
async def update_schedule(ref: str, changes: ScheduleUpdate, svc: Svc) -> ScheduleOut:
    """Change some fields; a new cron or zone counts fires from now on."""
    scheduler = svc.scheduler
    return schedule_out(scheduler.update(ref, changes), scheduler)


@router.delete(
    "/api/v1/schedules/{ref}", status_code=status.HTTP_204_NO_CONTENT, tags=["schedules"]
)
async def delete_schedule(ref: str, svc: Svc) -> Response:
    svc.scheduler.delete(ref)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/api/v1/schedules/{ref}/enable", tags=["schedules"])
async def enable_schedule(ref: str, svc: Svc) -> ScheduleOut:
    scheduler = svc.scheduler
    return schedule_out(scheduler.set_enabled(ref, True), scheduler)


@router.post("/api/v1/schedules/{ref}/disable", tags=["schedules"])
async def disable_schedule(ref: str, svc: Svc) -> ScheduleOut:
    scheduler = svc.scheduler
    return schedule_out(scheduler.set_enabled(ref, False), scheduler)


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
    scheduler = svc.scheduler
    run = await scheduler.run_now(ref)
    if wait:
        await scheduler.wait_run(run.id)
        run = scheduler.store.run(run.id) or run
    return run_out(run)


@router.get("/api/v1/schedules/{ref}/runs", tags=["schedules"])
async def schedule_runs(
    ref: str, svc: Svc, limit: Annotated[int, Query(ge=1, le=1000)] = 50
) -> list[RunOut]:
    """Newest first: cron fires, manual runs, missed and skipped fires, with outcomes."""
    return [run_out(run) for run in svc.scheduler.runs(ref, limit)]


# -------------------------------------------------------------------------------- reports


@router.get("/api/v1/reports", tags=["reports"])
async def list_reports(svc: Svc) -> list[ReportSummary]:
    return [ReportSummary(**r) for r in svc.reports.all()]


@router.get("/api/v1/reports/{label}", tags=["reports"])
async def get_report(label: str, svc: Svc) -> ReportOut:
    """One report by its file name stem, e.g. ``daily-2026-03-02``, ``weekly-2026-W09``."""
    doc, text = svc.reports.get(label)
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
    reports = svc.reports
    doc = await reports.generate(period, day)
    _, text = reports.get(doc["label"])
    return ReportOut(label=doc["label"], report=doc, text=text)
