"""Schedules, their runs and reports as the API shows them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel


class RunOut(BaseModel):
    id: int
    schedule_id: str
    trigger: str
    fire_at: datetime | None
    started_at: datetime
    finished_at: datetime | None
    status: str
    message: str
    results: list[dict[str, Any]]


class ScheduleOut(BaseModel):
    id: str
    name: str | None
    action: str
    vm: str | None
    selector: dict[str, str] | None
    cron: str
    tz: str
    spread_s: float
    grace_s: float
    options: dict[str, Any]
    enabled: bool
    created_at: datetime
    updated_at: datetime
    last_fire_at: datetime
    next_fire_at: datetime | None
    next_fire_local: str | None
    running_run_id: int | None
    last_run: RunOut | None


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
