"""The agent process: builds every service from the config, re-adopts running VMs, serves the API.

Stopping the agent (SIGTERM, SIGINT) lets go of the VMs without touching them; a SIGKILL
cannot touch them either, since each VMM lives in its own session with its output in files.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import uvicorn

from stoker.api.app import create_app
from stoker.config import AgentConfig, ConfigError, section
from stoker.domain.capabilities import Capabilities
from stoker.domain.spec import VMSpec
from stoker.drivers.base import Driver
from stoker.drivers.firecracker.driver import FirecrackerDriver, FirecrackerOptions
from stoker.drivers.qemu import QemuDriver
from stoker.host.proc import set_child_subreaper
from stoker.services.container import Background, Services
from stoker.services.directory import VMDirectory
from stoker.services.events import EventBus
from stoker.services.health import HealthConfig, HealthService
from stoker.services.hooks import HooksConfig, HookService
from stoker.services.lifecycle import Lifecycle
from stoker.services.loops import PeriodicTask
from stoker.services.metrics import Metrics
from stoker.services.quotas import QuotasConfig, QuotaService
from stoker.services.recovery import Recovery
from stoker.services.reports import ReportGenerator
from stoker.services.resources import ResourcesConfig, ResourceService, node_capacity
from stoker.services.scheduler import Scheduler, SchedulerConfig, host_tz_name, zone
from stoker.services.snapshots import SnapshotHousekeeping, SnapshotsConfig, SnapshotService
from stoker.store.db import Database
from stoker.store.events import EventStore
from stoker.store.health import HealthStore
from stoker.store.quotas import QuotaStore
from stoker.store.resources import ResourceStore
from stoker.store.schedules import ScheduleStore
from stoker.store.snapshots import SnapshotStore
from stoker.store.vms import VMStore

log = logging.getLogger("stoker.agent")


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the agent owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def build_drivers(config: AgentConfig) -> dict[str, Driver]:
    firecracker = FirecrackerDriver(FirecrackerOptions(binary=config.firecracker.binary))
    return {"qemu": QemuDriver(binary=config.qemu.binary), "firecracker": firecracker}


def build_services(
    config: AgentConfig, db: Database, drivers: Mapping[str, Driver] | None = None
) -> Services:
    """Build every service once, in the order their constructor arguments require.

    This is the only place that knows the whole agent: each capability receives the others
    it works with (or a narrow protocol of them) and nothing is patched after construction.
    ``drivers`` replaces the hypervisor drivers (tests wrap the real ones).
    """
    drivers = dict(drivers) if drivers is not None else build_drivers(config)

    def capabilities_of(spec: VMSpec) -> Capabilities:
        driver = drivers.get(spec.hypervisor.value)
        return driver.capabilities if driver is not None else Capabilities()

    clock = _utc_now
    events = EventBus(EventStore(db), clock=clock)
    directory = VMDirectory(VMStore(db), config.data_dir)

    # what takes part in a VM's life: built before the lifecycle, handed to it
    resources_cfg = section(config, "resources", ResourcesConfig)
    capacity, capacity_source = node_capacity(resources_cfg)
    resources = ResourceService(
        resources_cfg,
        ResourceStore(db),
        directory,
        events,
        capacity,
        capacity_source,
        clock=clock,
    )
    health_cfg = section(config, "health", HealthConfig)
    try:
        hooks = HookService(directory, events, section(config, "hooks", HooksConfig), clock=clock)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    health = HealthService(
        directory, events, HealthStore(db), health_cfg, probe_observers=[hooks], clock=clock
    )
    quotas_cfg = section(config, "quotas", QuotasConfig)
    quotas = QuotaService(directory, events, QuotaStore(db), quotas_cfg, capabilities_of)
    snapshot_store = SnapshotStore(db)
    housekeeping = SnapshotHousekeeping(directory, snapshot_store, events)

    lifecycle = Lifecycle(
        directory,
        events,
        drivers,
        gate=resources.gate,
        create_checks=[quotas, health],
        start_guards=[hooks, quotas],
        spawn_observers=[quotas],
        vmm_observers=[resources, health, quotas, housekeeping],
        boot_limits=quotas,
        clock=clock,
    )

    # what acts on VMs through the lifecycle
    recovery = Recovery(lifecycle, events, health_cfg, clock=clock)
    snapshots_cfg = section(config, "snapshots", SnapshotsConfig)
    snapshots = SnapshotService(lifecycle, snapshot_store, snapshots_cfg, clock=clock)
    scheduler_cfg = section(config, "scheduler", SchedulerConfig)
    tz_name = scheduler_cfg.tz or host_tz_name()
    reports = ReportGenerator(
        db,
        config.data_dir,
        zone(tz_name),
        resources.store,
        predictor=lambda: resources.predict(clock().timestamp()),
        clock=clock,
    )
    scheduler = Scheduler(
        ScheduleStore(db),
        lifecycle,
        events,
        snapshots,
        reports,
        scheduler_cfg,
        tz_name,
        clock=clock,
    )

    for listener in (
        resources.on_event,
        health.on_event,
        recovery.on_event,
        hooks.on_event,
        quotas.on_event,
        housekeeping.on_event,
        snapshots.on_event,
    ):
        events.add_listener(listener)

    background: list[Background] = [
        resources,
        hooks,  # stopped after recovery and health, so hooks see the end
        recovery,
        health,
        PeriodicTask("quota monitor", quotas.check_once, quotas_cfg.monitor_interval_s),
        PeriodicTask("automatic snapshots", snapshots.run_due, snapshots_cfg.tick_s),
    ]
    if scheduler_cfg.enabled:
        background.append(scheduler)
    return Services(
        directory=directory,
        events=events,
        lifecycle=lifecycle,
        resources=resources,
        metrics=Metrics(resources),
        health=health,
        recovery=recovery,
        hooks=hooks,
        quotas=quotas,
        snapshots=snapshots,
        snapshot_housekeeping=housekeeping,
        scheduler=scheduler,
        reports=reports,
        background=tuple(background),
    )


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Agent:
    config: AgentConfig
    #: hypervisor drivers to use instead of the configured ones (tests wrap the real ones)
    drivers: Mapping[str, Driver] | None = None
    db: Database = field(init=False)
    services: Services = field(init=False)
    _servers: list[_Server] = field(default_factory=list)
    _background: list[asyncio.Task[None]] = field(default_factory=list)

    def build(self) -> Services:
        """Open the store and build the services; start-up repairs come before re-adoption."""
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        (self.config.data_dir / "vms").mkdir(exist_ok=True)
        self.db = Database(self.config.db_path)
        self.services = build_services(self.config, self.db, self.drivers)
        self.services.resources.reconcile()
        self.services.snapshot_housekeeping.cleanup_leftovers()
        if self.services.scheduler.config.enabled:
            self.services.scheduler.ensure_default_report()
        return self.services

    def _listen_unix(self, path: Path) -> socket.socket:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        os.chmod(path, self.config.api.socket_mode)
        sock.listen(128)
        return sock

    def _listen_tcp(self, host: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        return sock

    async def run(self, ready: asyncio.Event | None = None) -> None:
        set_child_subreaper()
        services = self.build()
        await services.lifecycle.recover()
        # Everything built so far lives as long as the agent: keep it out of the cyclic
        # collector's full passes, which otherwise stall requests once thousands of VMs are
        # registered.
        gc.freeze()
        for loop_service in services.background:
            await loop_service.start()
        listeners: list[tuple[socket.socket, str | None]] = [
            (self._listen_unix(self.config.socket_path), None)
        ]
        if self.config.api.tcp_port is not None:
            listeners.append(
                (
                    self._listen_tcp(self.config.api.tcp_host, self.config.api.tcp_port),
                    self.config.api.resolved_token(),
                )
            )
        for sock, token in listeners:
            app = create_app(services, token=token)
            server = _Server(uvicorn.Config(app, lifespan="off", log_config=None, access_log=False))
            self._servers.append(server)
            self._background.append(asyncio.create_task(server.serve(sockets=[sock])))
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info(
            "agent ready",
            extra={"socket": str(self.config.socket_path), "tcp_port": self.config.api.tcp_port},
        )
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("agent stopping; VMs keep running")
        await self.close()

    async def close(self) -> None:
        for server in self._servers:
            server.should_exit = True
        await asyncio.gather(*self._background, return_exceptions=True)
        for loop_service in reversed(self.services.background):
            try:
                await loop_service.stop()
            except Exception:
                log.exception("stopping a background service failed")
        await self.services.lifecycle.shutdown()
        await self.services.events.drain()
        self.db.close()
        with contextlib.suppress(FileNotFoundError):
            self.config.socket_path.unlink()
