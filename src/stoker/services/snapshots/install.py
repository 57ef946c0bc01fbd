"""Wiring the snapshots capability into an agent (``agent.py`` calls ``install``)."""

from __future__ import annotations

from stoker.config import AgentConfig
from stoker.services.container import Services
from stoker.services.loops import PeriodicTask
from stoker.services.snapshots.service import SnapshotService
from stoker.services.snapshots.settings import load_settings
from stoker.store.db import Database
from stoker.store.snapshots import SnapshotStore


def install(services: Services, config: AgentConfig, db: Database) -> None:
    """Register ``services.extra["snapshots"]``, clean leftovers, start the auto timer."""
    settings = load_settings(config)
    service = SnapshotService(services.lifecycle, SnapshotStore(db), settings)
    service.cleanup_leftovers()
    services.lifecycle.on_vmm_up.append(service.resume_interrupted)
    services.events.add_listener(service.on_event)
    services.extra["snapshots"] = service
    # the built-in timer for automatic snapshots (until the scheduler capability owns it)
    services.background.append(
        PeriodicTask("automatic snapshots", service.run_due, settings.tick_s)
    )
