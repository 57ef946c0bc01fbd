"""Cron-like schedules of VM operations (start, stop, restart, snapshot) and reports.

Split by job: ``settings`` (config section, zone names), ``spec`` (what an operator may ask
for), ``service`` (the schedules themselves), ``loop`` (when they fire: misfires, overlap,
run records), ``actions`` (what a run does to each VM), ``wiring`` (how the agent installs it).
The names other modules use are re-exported here.
"""

from stoker.services.scheduler.actions import label
from stoker.services.scheduler.loop import MAX_MISSED_ROWS, ScheduleLoop
from stoker.services.scheduler.service import DEFAULT_REPORT_NAME, Scheduler
from stoker.services.scheduler.settings import (
    SchedulerConfig,
    ZoneName,
    host_tz_name,
    load_config,
    zone,
)
from stoker.services.scheduler.spec import (
    ACTION_OPTIONS,
    Action,
    ScheduleSpec,
    ScheduleUpdate,
    check_options,
)
from stoker.services.scheduler.wiring import install

__all__ = [
    "ACTION_OPTIONS",
    "DEFAULT_REPORT_NAME",
    "MAX_MISSED_ROWS",
    "Action",
    "ScheduleLoop",
    "ScheduleSpec",
    "ScheduleUpdate",
    "Scheduler",
    "SchedulerConfig",
    "ZoneName",
    "check_options",
    "host_tz_name",
    "install",
    "label",
    "load_config",
    "zone",
]
