"""Cron-like schedules of VM operations (start, stop, restart, snapshot) and reports.

Split by job: ``config`` (config section, zone names), ``spec`` (what an operator may ask
for), ``service`` (the schedules themselves), ``loop`` (when they fire: misfires, overlap,
run records), ``actions`` (what a run does to each VM).
The names other modules use are re-exported here.
"""

from stoker.services.scheduler.actions import label
from stoker.services.scheduler.config import (
    SchedulerConfig,
    ZoneName,
    host_tz_name,
    zone,
)
from stoker.services.scheduler.loop import MAX_MISSED_ROWS, ScheduleLoop
from stoker.services.scheduler.service import DEFAULT_REPORT_NAME, Scheduler
from stoker.services.scheduler.spec import (
    ACTION_OPTIONS,
    ScheduleAction,
    ScheduleSpec,
    ScheduleUpdate,
    check_options,
)

__all__ = [
    "ACTION_OPTIONS",
    "DEFAULT_REPORT_NAME",
    "MAX_MISSED_ROWS",
    "ScheduleAction",
    "ScheduleLoop",
    "ScheduleSpec",
    "ScheduleUpdate",
    "Scheduler",
    "SchedulerConfig",
    "ZoneName",
    "check_options",
    "host_tz_name",
    "label",
    "zone",
]
