"""Installs the capacity gate, the sampling loop and the /metrics collector into the agent."""

from __future__ import annotations

import logging

import psutil

from stoker.config import AgentConfig
from stoker.domain.states import ACTIVE_STATES, VMState
from stoker.services.container import Services
from stoker.services.metrics import Metrics
from stoker.services.resources.service import ResourceService
from stoker.services.resources.settings import load_config, node_capacity
from stoker.store.db import Database
from stoker.store.resources import ResourceStore

log = logging.getLogger("stoker.resources")

#: a VM in these states may hold a VMM (error keeps its reservation until cleanup)
HOLDING_STATES = [s.value for s in ACTIVE_STATES]
FREE_STATES = [VMState.PENDING.value, VMState.STOPPED.value]


def install(services: Services, config: AgentConfig, db: Database) -> None:
    """Install the capacity gate, the sampling loop and the /metrics collector.

    Reservations left inconsistent by an agent that died mid-change are repaired first, so
    the gate starts from what is really running.
    """
    cfg = load_config(config)
    capacity, source = node_capacity(cfg)
    store = ResourceStore(db)
    service = ResourceService(
        cfg, store, services.lifecycle, services.events, capacity, source,
        clock=services.lifecycle.clock,
    )  # fmt: skip
    dropped, added = store.reconcile(HOLDING_STATES, FREE_STATES, service.clock())
    if dropped or added:
        log.warning(
            "repaired reservations left by an earlier agent: dropped %d, added %d", dropped, added
        )
    services.lifecycle.gate = service.gate
    services.lifecycle.on_vmm_up.append(service.on_vmm_up)
    services.events.add_listener(service.on_event)
    services.extra["resources"] = service
    services.extra["metrics"] = Metrics(service)
    services.background.append(service)
    psutil.cpu_percent(interval=None)  # prime the host CPU counter for the first sweep
