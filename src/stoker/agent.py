"""The agent process: builds every service from the config, re-adopts running VMs, serves the API.

Stopping the agent (SIGTERM, SIGINT) lets go of the VMs without touching them; a SIGKILL
cannot touch them either, since each VMM lives in its own session with its output in files.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from stoker.api import serve
from stoker.api.app import create_app
from stoker.config import AgentConfig, ConfigError, section
from stoker.domain.capabilities import Capabilities
from stoker.domain.spec import VMSpec
from stoker.domain.uids import UidRange
from stoker.drivers.base import Driver
from stoker.drivers.firecracker.driver import (
    FirecrackerDriver,
    FirecrackerOptions,
    JailerConfig,
)
from stoker.drivers.qemu import QemuDriver
from stoker.drivers.qemu_launch import LaunchSettings
from stoker.host.images import ImagePolicy, agent_private_paths
from stoker.host.lockfile import DataDirLock
from stoker.host.proc import set_child_subreaper
from stoker.host.sdnotify import Notifier
from stoker.services.backups import DatabaseBackups, DatabaseConfig
from stoker.services.container import Background, Services
from stoker.services.directory import VMDirectory
from stoker.services.events import EventBus
from stoker.services.health import HealthConfig, HealthService
from stoker.services.history import HistoryConfig, LogRotation
from stoker.services.hooks import HooksConfig, HookService
from stoker.services.identities import VMIdentities
from stoker.services.lifecycle import Lifecycle
from stoker.services.loops import PeriodicTask
from stoker.services.manifests import ManifestConfig, ManifestService, ManifestWatcher
from stoker.services.metrics import Metrics
from stoker.services.networks import NetworkConfig, NetworkHost, NetworkService
from stoker.services.networks import probe as probe_networking
from stoker.services.quotas import QuotasConfig, QuotaService
from stoker.services.recovery import Recovery
from stoker.services.reports import ReportGenerator
from stoker.services.resources import ResourcesConfig, ResourceService, node_capacity
from stoker.services.scheduler import Scheduler, SchedulerConfig, host_tz_name, zone
from stoker.services.snapshots import SnapshotHousekeeping, SnapshotsConfig, SnapshotService
from stoker.services.warmstart import WarmStartConfig, WarmStarts
from stoker.startup import StartRefused, prepare_data_dir
from stoker.store.db import Database
from stoker.store.events import EventStore
from stoker.store.health import HealthStore
from stoker.store.manifests import ManifestStore
from stoker.store.networks import NetworkStore
from stoker.store.quotas import QuotaStore
from stoker.store.resources import ResourceStore
from stoker.store.schedules import ScheduleStore
from stoker.store.snapshots import SnapshotStore
from stoker.store.uids import UidStore
from stoker.store.vms import VMStore

if TYPE_CHECKING:  # cluster mode is imported only when configured: it brings gRPC
    from stoker.cluster.service import ClusterMembership

log = logging.getLogger("stoker.agent")


def image_policy(config: AgentConfig) -> ImagePolicy:
    """The image pools, minus the agent's own files (every VM's directory, the database)."""
    return ImagePolicy.create(
        config.image_pools, agent_private_paths(config.data_dir, config.db_path)
    )


def build_drivers(config: AgentConfig) -> dict[str, Driver]:
    security = config.security
    if not security.confine:
        log.warning(
            "CONFINEMENT IS OFF ([security] confine = false): every VMM runs as root with the "
            "agent's view of the host; a guest that escapes its VMM owns this host. Use this "
            "for development only."
        )
    qemu = QemuDriver(
        LaunchSettings(
            binary=config.qemu.binary,
            images=image_policy(config),
            confine=security.mode if security.confine else None,
            user_net_outbound=security.user_net_outbound,
        )
    )
    jailer = None
    if security.confine:
        jailer = JailerConfig(
            binary=config.firecracker.jailer or "jailer",
            chroot_base=config.data_dir / "jail",
        )
    firecracker = FirecrackerDriver(
        FirecrackerOptions(
            binary=config.firecracker.binary, jailer=jailer, images=image_policy(config)
        )
    )
    return {"qemu": qemu, "firecracker": firecracker}


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
    history_cfg = section(config, "history", HistoryConfig)
    directory = VMDirectory(VMStore(db, history_cfg.transitions_per_vm), config.data_dir)
    network_cfg = section(config, "network", NetworkConfig)
    network_root = network_cfg.state_root(config.data_dir)
    networks = NetworkService(
        network_cfg,
        NetworkStore(db),
        directory,
        NetworkHost(network_cfg, network_root),
        probe_networking(network_cfg, network_root),
        capabilities_of,
        clock=clock,
        events=events,
    )

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
        directory,
        events,
        HealthStore(db),
        health_cfg,
        probe_observers=[hooks],
        addresses=networks,
        clock=clock,
    )
    quotas_cfg = section(config, "quotas", QuotasConfig)
    quotas = QuotaService(directory, events, QuotaStore(db), quotas_cfg, capabilities_of)
    snapshot_store = SnapshotStore(db)
    housekeeping = SnapshotHousekeeping(directory, snapshot_store, events)

    identities = (
        VMIdentities(UidStore(db), UidRange.parse(config.security.vm_uid_range), clock=clock)
        if config.security.confine
        else None
    )
    warm = WarmStarts(
        directory,
        events,
        section(config, "warm_start", WarmStartConfig),
        lambda spec: hypervisor_version(drivers, spec.hypervisor.value),
        clock=clock,
    )
    membership: ClusterMembership | None = None
    if "cluster" in config.sections:  # cluster mode (docs/cluster.md); absent: single host
        from stoker.cluster.service import ClusterMembership

        membership = ClusterMembership.from_config(config, resources.capacity)
    lifecycle = Lifecycle(
        directory,
        events,
        drivers,
        gate=resources.gate,
        create_checks=[quotas, health, networks, warm],
        start_guards=[hooks, quotas, *([membership.ownership] if membership else [])],
        spawn_observers=[quotas],
        vmm_observers=[resources, health, quotas, housekeeping, warm],
        boot_limits=quotas,
        spec_defaults=[networks],
        network=networks,
        identities=identities,
        vm_snapshots=housekeeping,
        warm=warm,
        ready_observers=[warm],
        clock=clock,
    )

    cluster = membership.node(lifecycle, networks) if membership else None

    # what acts on VMs through the lifecycle
    recovery = Recovery(lifecycle, events, health_cfg, clock=clock)
    snapshots_cfg = section(config, "snapshots", SnapshotsConfig)
    snapshots = SnapshotService(
        lifecycle, snapshot_store, snapshots_cfg, clock=clock, locks=housekeeping.locks
    )
    scheduler_cfg = section(config, "scheduler", SchedulerConfig)
    tz_name = scheduler_cfg.tz or host_tz_name()
    reports = ReportGenerator(
        db,
        config.data_dir,
        zone(tz_name),
        resources.store,
        predictor=lambda: resources.predict(clock().timestamp()),
        clock=clock,
        keep=history_cfg.reports_keep(),
    )
    scheduler = Scheduler(
        ScheduleStore(db, history_cfg.runs_per_schedule),
        lifecycle,
        events,
        snapshots,
        reports,
        scheduler_cfg,
        tz_name,
        clock=clock,
    )
    manifest_cfg = section(config, "manifest", ManifestConfig)
    manifests = ManifestService(
        lifecycle,
        quotas,
        snapshots,
        scheduler,
        networks,
        ManifestStore(db),
        events,
        watching=manifest_cfg.path,
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
        networks.on_event,
        *([identities.on_event] if identities else []),
        *([cluster.on_event] if cluster else []),
    ):
        events.add_listener(listener)

    background: list[Background] = [
        networks,  # first: VMs that recovery restarts find their networks reconciled
        resources,
        hooks,  # stopped after recovery and health, so hooks see the end
        recovery,
        health,
        PeriodicTask("quota monitor", quotas.check_once, quotas_cfg.monitor_interval_s),
        PeriodicTask("automatic snapshots", snapshots.run_due, snapshots_cfg.tick_s),
        LogRotation(directory, history_cfg),
        DatabaseBackups(
            config.db_path, config.data_dir, section(config, "database", DatabaseConfig), events
        ),
    ]
    if scheduler_cfg.enabled:
        background.append(scheduler)
    if manifest_cfg.path is not None:  # last: applies onto everything else, reconciled
        background.append(ManifestWatcher(manifest_cfg, manifests))
    if cluster is not None:  # its fencer guards re-adopted cluster VMs from here on
        background.append(cluster)
    return Services(
        directory=directory,
        events=events,
        lifecycle=lifecycle,
        resources=resources,
        metrics=Metrics(resources),
        health=health,
        recovery=recovery,
        hooks=hooks,
        networks=networks,
        quotas=quotas,
        snapshots=snapshots,
        snapshot_housekeeping=housekeeping,
        scheduler=scheduler,
        reports=reports,
        manifests=manifests,
        warm=warm,
        background=tuple(background),
        cluster=cluster,
    )


def hypervisor_version(drivers: Mapping[str, Driver], name: str) -> str:
    """A driver's hypervisor version (saved state is valid for that version only)."""
    driver = drivers.get(name)
    return driver.version if isinstance(driver, QemuDriver) else "unknown"


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Agent:
    config: AgentConfig
    #: hypervisor drivers to use instead of the configured ones (tests wrap the real ones)
    drivers: Mapping[str, Driver] | None = None
    db: Database = field(init=False)
    services: Services = field(init=False)
    _serving: serve.Serving = field(default_factory=serve.Serving)
    _lock: DataDirLock | None = None
    #: systemd's notify socket (Type=notify, WatchdogSec=); does nothing outside systemd
    _notifier: Notifier = field(default_factory=Notifier)

    def build(self) -> Services:
        """Open the store and build the services; start-up repairs come before re-adoption."""
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        (self.config.data_dir / "vms").mkdir(exist_ok=True)
        self.db = Database(self.config.db_path)
        self.services = build_services(self.config, self.db, self.drivers)
        self.services.resources.reconcile()
        self.services.snapshot_housekeeping.cleanup_leftovers()
        self.services.warm.cleanup_leftovers()
        if self.services.scheduler.config.enabled:
            self.services.scheduler.ensure_default_report()
        return self.services

    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Refuse early (a bad token, another agent on the data dir, a damaged database),
        then build, re-adopt, serve until SIGTERM or SIGINT."""
        api = self.config.api
        token = api.resolved_token()  # ConfigError: empty, short or world-readable
        if api.tls_cert is not None and api.tls_key is not None:
            try:
                serve.check_tls_files(api.tls_cert, api.tls_key)
            except serve.ServeError as exc:
                raise StartRefused(str(exc)) from None
        self._lock = prepare_data_dir(self.config, section(self.config, "database", DatabaseConfig))
        try:
            await self._run(token, ready)
        finally:
            self._lock.release()

    async def _run(self, token: str | None, ready: asyncio.Event | None) -> None:
        set_child_subreaper()
        serve.check_socket_free(self.config.socket_path)  # before re-adopting anything
        soft, hard = serve.raise_descriptor_limit()
        serve.quiet_accept_errors(asyncio.get_running_loop())
        log.debug("descriptor limit %d (hard %d)", soft, hard)
        services = self.build()
        await services.lifecycle.recover()
        # Everything built so far lives as long as the agent: keep it out of the cyclic
        # collector's full passes, which otherwise stall requests once thousands of VMs are
        # registered.
        gc.freeze()
        for loop_service in services.background:
            await loop_service.start()
        self._serve(services, token)
        await self._listening()
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
        # after re-adoption and with every listener serving: systemd may now count on us
        self._notifier.ready(f"serving; {len(services.directory.owned_items())} VMMs running")
        self._notifier.start_watchdog()
        await stop.wait()
        self._notifier.stopping()
        log.info("agent stopping; VMs keep running")
        await self.close()
        await self._notifier.stop_watchdog()

    async def _listening(self, timeout_s: float = 30.0) -> None:
        """Wait until every listener's server has started, so READY=1 means it answers; a
        server that failed to start raises its error here."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not all(server.started for server in self._serving.servers):
            for task in self._serving.tasks:
                if task.done():
                    task.result()  # its exception, if it failed
            if loop.time() > deadline:
                raise StartRefused(f"the API listeners did not start within {timeout_s:g} s")
            await asyncio.sleep(0.005)

    def _serve(self, services: Services, token: str | None) -> None:
        """The Unix socket, and TCP when configured: each its own server and limits."""
        api = self.config.api
        limits = serve.Limits(
            max_connections=api.max_connections,
            header_timeout_s=api.header_timeout_s,
            keepalive_timeout_s=api.keepalive_timeout_s,
            max_header_bytes=api.max_header_bytes,
            max_body_bytes=api.max_body_bytes,
        )
        unix = serve.listen_unix(self.config.socket_path, api.socket_mode)
        self._serving.unix = unix
        self._serving.add("unix", create_app(services), unix.sock, limits)
        if api.tcp_port is not None:
            tcp = serve.listen_tcp(api.tcp_host, api.tcp_port)
            tls = (api.tls_cert, api.tls_key) if api.tls_cert and api.tls_key else None
            self._serving.add("tcp", create_app(services, token=token), tcp, limits, tls)

    async def close(self) -> None:
        await self._serving.close()
        for loop_service in reversed(self.services.background):
            try:
                await loop_service.stop()
            except Exception:
                log.exception("stopping a background service failed")
        await self.services.lifecycle.shutdown()
        await self.services.events.drain()
        self.db.close()
