"""Schedules and their runs as records: what the scheduler, the store and the API share."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class ScheduleRecord:
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
    #: the latest fire time already handled (ran, missed or skipped); fires after it are due
    last_fire_at: datetime


@dataclass(frozen=True)
class RunRecord:
    id: int
    schedule_id: str
    trigger: str
    fire_at: datetime | None
    started_at: datetime
    finished_at: datetime | None
    status: str
    message: str
    results: list[dict[str, Any]]
