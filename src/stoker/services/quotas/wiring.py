"""How the quota capability plugs into an agent: service, hooks, drivers and monitor loop."""

from __future__ import annotations

from dataclasses import replace

from stoker.config import AgentConfig
from stoker.services.container import Services
from stoker.services.lifecycle import Lifecycle
from stoker.services.loops import PeriodicTask
from stoker.services.quotas.placement import CgroupPlacingDriver
from stoker.services.quotas.service import QuotaService
from stoker.services.quotas.settings import load_settings
from stoker.store.db import Database
from stoker.store.quotas import QuotaStore


def install(services: Services, config: AgentConfig, db: Database) -> None:
    """Register the quota service, its start hooks, its event listener and its monitor."""
    settings = load_settings(config)
    service = QuotaService(services, settings, QuotaStore(db))
    services.extra["quotas"] = service
    lifecycle = services.lifecycle
    lifecycle.on_vmm_up.append(service.on_vmm_up)
    lifecycle.pre_start.append(service.pre_start)
    create_checks = getattr(lifecycle, "create_checks", None)
    if create_checks is not None:
        create_checks.append(service.check_spec)
    services.events.add_listener(service.on_event)
    _firecracker_limits_from(service, lifecycle)
    for name, driver in list(lifecycle.drivers.items()):
        lifecycle.drivers[name] = CgroupPlacingDriver(driver, service.place_early)  # type: ignore[assignment]
    services.background.append(
        PeriodicTask("quota monitor", service.check_once, settings.monitor_interval_s)
    )


def _firecracker_limits_from(service: QuotaService, lifecycle: Lifecycle) -> None:
    """Firecracker takes its rate limiters in the boot configuration: have it ask us."""
    firecracker = lifecycle.drivers.get("firecracker")
    fc_config = getattr(firecracker, "config", None)
    if fc_config is not None and hasattr(fc_config, "limits_for"):
        firecracker.config = replace(fc_config, limits_for=service.io_limits_for)  # type: ignore[union-attr]
