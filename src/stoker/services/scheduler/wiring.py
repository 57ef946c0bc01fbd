"""How the agent plugs schedules and reports in (``Agent.build`` calls ``install``)."""

from __future__ import annotations

from stoker.config import AgentConfig
from stoker.services.container import Services
from stoker.services.reports import ReportGenerator
from stoker.services.scheduler.service import Scheduler
from stoker.services.scheduler.settings import host_tz_name, load_config, zone
from stoker.store import schedules as st
from stoker.store.db import Database


def install(services: Services, config: AgentConfig, db: Database) -> None:
    """Register ``services.extra['scheduler']`` and ``['reports']``; add the schedule loop."""
    cfg = load_config(config)
    tz_name = cfg.tz or host_tz_name()
    resources = services.extra.get("resources")
    samples = getattr(resources, "store", None)
    predict = getattr(resources, "predict", None)
    clock = services.lifecycle.clock
    reports = ReportGenerator(
        db,
        config.data_dir,
        zone(tz_name),
        samples,
        predictor=(lambda: predict(clock().timestamp())) if predict else None,
        clock=clock,
    )
    scheduler = Scheduler(
        st.ScheduleStore(db),
        services.lifecycle,
        services.events,
        services.extra,
        reports,
        cfg,
        tz_name,
        clock=clock,
    )
    services.extra["reports"] = reports
    services.extra["scheduler"] = scheduler
    if cfg.enabled:
        scheduler.ensure_default_report()
        services.background.append(scheduler)
