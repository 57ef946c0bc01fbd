"""Node capacity and reservations, usage sampling, history, prediction and alerts.

The gate reserves a VM's vCPUs and memory before its VMM is spawned, in one critical
section and one database transaction, and releases them once the VMM is gone; the rows
outlive the agent, so a re-adopted VM stays counted. A background loop samples each running
VM every ``interval_s``, stores node and VM samples (folded into coarser buckets as they age),
fits a trend over the prediction window and raises or clears threshold alerts as events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psutil
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from stoker.config import AgentConfig, ConfigError
from stoker.domain import alerts, trend
from stoker.domain.capacity import (
    Allocation,
    NodeCapacity,
    Request,
    available,
    check_fit,
)
from stoker.domain.states import ACTIVE_STATES, VMState
from stoker.domain.units import MiB, parse_duration
from stoker.domain.vm import VM
from stoker.drivers.base import VMM
from stoker.services.container import Services
from stoker.services.errors import Conflict
from stoker.services.events import EventBus
from stoker.services.lifecycle import Lifecycle
from stoker.services.sampling import Reading, VMSampler
from stoker.store.db import Database
from stoker.store.events import Event
from stoker.store.resources import NodeSample, ResourceStore, VMSample

log = logging.getLogger("stoker.resources")

#: samples finer than the bucket are kept this long, then folded
RAW_KEEP_S = 3600.0
#: folded samples are this coarse (or five sampling intervals, if that is coarser)
BUCKET_S = 300.0


class ResourcesConfig(BaseModel):
    """The ``[resources]`` section (env: ``STOKER_RESOURCES__<KEY>``)."""

    model_config = ConfigDict(extra="forbid")

    max_vms: int = Field(default=50, ge=0, le=100_000)
    cpu_overcommit: float = Field(default=2.0, gt=0, le=100)
    memory_headroom: float = Field(default=0.20, ge=0, lt=1)
    host_cpus: int | None = Field(default=None, ge=1, description="override the host's count")
    host_memory_mib: int | None = Field(default=None, ge=1, description="override host memory")
    interval_s: float = Field(default=60.0, ge=1, le=3600)
    history_s: float = Field(default=86_400.0, ge=60, le=90 * 86_400)
    prediction_window_s: float = Field(default=3600.0, ge=10, le=90 * 86_400)
    cpu_alert: float = Field(default=0.80, gt=0, le=10, description="fraction of capacity")
    memory_alert: float = Field(default=0.90, gt=0, le=10, description="fraction of capacity")
    alert_hysteresis: float = Field(default=alerts.DEFAULT_HYSTERESIS, ge=0, le=1)

    @field_validator("interval_s", "history_s", "prediction_window_s", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value) if isinstance(value, str) else value


def load_config(config: AgentConfig) -> ResourcesConfig:
    try:
        return ResourcesConfig.model_validate(config.sections.get("resources", {}))
    except (ValidationError, ValueError) as exc:
        if isinstance(exc, ValidationError):
            problems = "; ".join(
                f"resources.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
            )
        else:
            problems = str(exc)
        raise ConfigError(f"invalid configuration: {problems}") from None


def node_capacity(cfg: ResourcesConfig) -> tuple[NodeCapacity, dict[str, str]]:
    """Capacity from the host, with the config's overrides; also says where each came from."""
    cpus = cfg.host_cpus or psutil.cpu_count(logical=True) or 1
    memory = cfg.host_memory_mib * MiB if cfg.host_memory_mib else psutil.virtual_memory().total
    source = {
        "cpus": "config" if cfg.host_cpus else "host",
        "memory": "config" if cfg.host_memory_mib else "host",
    }
    cap = NodeCapacity(
        physical_cpus=cpus,
        memory_bytes=memory,
        max_vms=cfg.max_vms,
        cpu_overcommit=cfg.cpu_overcommit,
        memory_headroom=cfg.memory_headroom,
    )
    return cap, source


def request_of(vm: VM) -> Request:
    return Request(vcpus=vm.spec.vcpus, memory_bytes=vm.spec.memory_mib * MiB)


class CapacityGate:
    """The lifecycle's ResourceGate: check and reserve atomically, release idempotently."""

    def __init__(
        self, store: ResourceStore, capacity: NodeCapacity, clock: Callable[[], datetime]
    ) -> None:
        self.store = store
        self.capacity = capacity
        self.clock = clock
        # the DB transaction already serialises writers; the lock keeps the check and the
        # write one step for threads sharing this process's connection too
        self._lock = threading.Lock()

    def reserve(self, vm: VM) -> None:
        request = request_of(vm)
        with self._lock:
            shortfall = self.store.reserve(
                vm.id,
                request,
                self.clock(),
                lambda allocated: check_fit(self.capacity, allocated, request),
            )
        if shortfall is not None:
            raise Conflict(
                f"cannot start {vm.name}: {shortfall.message()}",
                resource=shortfall.resource,
                requested=shortfall.requested,
                available=shortfall.available,
                limit=shortfall.limit,
            )

    def release(self, vm_id: str) -> None:
        with self._lock:
            self.store.release(vm_id)


@dataclass
class _Tracked:
    vm: VM
    vmm: VMM


@dataclass(frozen=True)
class AlertView:
    resource: str
    active: bool
    since: datetime | None
    value: float | None
    raise_at: float
    clear_at: float


class ResourceService:
    """Sampling loop, history, prediction and alerts; also what the API and /metrics read."""

    def __init__(
        self,
        cfg: ResourcesConfig,
        store: ResourceStore,
        lifecycle: Lifecycle,
        events: EventBus,
        capacity: NodeCapacity,
        capacity_source: dict[str, str],
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.lifecycle = lifecycle
        self.events = events
        self.capacity = capacity
        self.capacity_source = capacity_source
        self.clock = clock or (lambda: datetime.now(UTC))
        self.gate = CapacityGate(store, capacity, self.clock)
        self.sampler = VMSampler()
        self.thresholds = {
            "cpu": alerts.Threshold.at("cpu", cfg.cpu_alert, cfg.alert_hysteresis),
            "memory": alerts.Threshold.at("memory", cfg.memory_alert, cfg.alert_hysteresis),
        }
        self.alert_states: dict[str, alerts.AlertState] = {
            k: alerts.INACTIVE for k in self.thresholds
        }
        self.alert_values: dict[str, float | None] = {k: None for k in self.thresholds}
        self.latest: dict[str, Reading] = {}
        self.latest_node: NodeSample | None = None
        self.predictions: list[trend.Prediction] = []
        self.last_sweep_cpu_s: float | None = None
        self.last_sweep_wall_s: float | None = None
        self._tracked: dict[str, _Tracked] = {}
        self._task: asyncio.Task[None] | None = None
        self._last_compact = 0.0
        self.bucket_s = max(BUCKET_S, 5 * cfg.interval_s)

    # ----------------------------------------------------------------------- VM tracking

    def on_vmm_up(self, vm: VM, vmm: VMM) -> None:
        """A VMM became running (start, restart, re-adoption): sample it from now on."""
        self._tracked[vm.id] = _Tracked(vm, vmm)

    def on_event(self, event: Event) -> None:
        if event.type == "vm.deleted" and event.vm_id:
            self._forget(event.vm_id)
            self.store.drop_vm_samples(event.vm_id)

    def _forget(self, vm_id: str) -> None:
        self._tracked.pop(vm_id, None)
        self.latest.pop(vm_id, None)
        self.sampler.forget(vm_id)

    def _live(self) -> list[_Tracked]:
        """Tracked VMs whose VMM is still the one the lifecycle owns."""
        live = []
        for vm_id, tracked in list(self._tracked.items()):
            if self.lifecycle.vmm(vm_id) is tracked.vmm:
                live.append(tracked)
            else:
                self._forget(vm_id)
        return live

    # -------------------------------------------------------------------------- sampling

    async def sweep(self) -> None:
        """Sample every running VM and the node, store it, update predictions and alerts."""
        cpu0, wall0 = time.process_time(), time.perf_counter()
        now = self.clock()
        t = now.timestamp()
        live = self._live()
        readings = await asyncio.gather(
            *(self.sampler.sample(x.vm, x.vmm, t) for x in live), return_exceptions=True
        )
        good: list[Reading] = []
        for tracked, reading in zip(live, readings, strict=True):
            if isinstance(reading, BaseException):
                log.warning("sampling %s failed: %s", tracked.vm.name, reading)
                continue
            good.append(reading)
            self.latest[tracked.vm.id] = reading
        node = self._node_sample(t, good)
        self.latest_node = node
        self.store.add_samples(node, [_vm_sample(r, self.cfg.interval_s) for r in good])
        if t - self._last_compact >= 60:
            self._last_compact = t
            self.store.compact(t, max(RAW_KEEP_S, 10 * self.cfg.interval_s), self.bucket_s,
                               self.cfg.history_s)  # fmt: skip
        self.predictions = self.predict(t)
        self._evaluate_alerts(node, now)
        self.last_sweep_cpu_s = time.process_time() - cpu0
        self.last_sweep_wall_s = time.perf_counter() - wall0

    def _node_sample(self, t: float, readings: list[Reading]) -> NodeSample:
        allocated = self.store.allocated()
        cores = [r.cpu_cores for r in readings if r.cpu_cores is not None]
        rss = [r.memory_bytes for r in readings if r.memory_bytes is not None]
        host_memory = psutil.virtual_memory()
        return NodeSample(
            t=t,
            resolution_s=self.cfg.interval_s,
            vms=allocated.vms,
            vcpus_allocated=allocated.vcpus,
            memory_allocated=allocated.memory_bytes,
            # with no VM running, nothing is used: that is a measurement, not a guess
            cpu_used=math.fsum(cores) if cores or not readings else None,
            memory_used=float(sum(rss)) if rss or not readings else None,
            host_cpu_percent=psutil.cpu_percent(interval=None),
            host_memory_used=float(host_memory.total - host_memory.available),
        )

    # ------------------------------------------------------------------ prediction, alerts

    def capacities(self) -> dict[str, float]:
        """What each predicted series runs out against."""
        cap = self.capacity
        return {
            "vms_allocated": cap.max_vms,
            "cpu_allocated": cap.vcpu_limit,
            "memory_allocated": cap.memory_limit_bytes,
            "cpu_used": cap.physical_cpus,
            "memory_used": cap.memory_limit_bytes,
        }

    def predict(self, now_t: float) -> list[trend.Prediction]:
        window = self.cfg.prediction_window_s
        samples = self.store.node_samples(now_t - window, now_t)
        series: dict[str, list[tuple[float, float]]] = {k: [] for k in self.capacities()}
        for s in samples:
            series["vms_allocated"].append((s.t, s.vms))
            series["cpu_allocated"].append((s.t, s.vcpus_allocated))
            series["memory_allocated"].append((s.t, s.memory_allocated))
            if s.cpu_used is not None:
                series["cpu_used"].append((s.t, s.cpu_used))
            if s.memory_used is not None:
                series["memory_used"].append((s.t, s.memory_used))
        return [
            trend.predict(name, series[name], capacity, now_t, window)
            for name, capacity in self.capacities().items()
        ]

    def _evaluate_alerts(self, node: NodeSample, now: datetime) -> None:
        cap = self.capacity
        values = {
            "cpu": node.cpu_used / cap.physical_cpus if node.cpu_used is not None else math.nan,
            "memory": (
                node.memory_used / cap.memory_limit_bytes
                if node.memory_used is not None and cap.memory_limit_bytes > 0
                else math.nan
            ),
        }
        for resource, threshold in self.thresholds.items():
            value = values[resource]
            self.alert_values[resource] = None if math.isnan(value) else value
            state, change = alerts.evaluate(threshold, self.alert_states[resource], value, now)
            self.alert_states[resource] = state
            if change is None:
                continue
            what = "CPU used by VMs" if resource == "cpu" else "memory used by VMMs"
            if change == "raised":
                message = f"{what} at {value:.0%} of capacity, at or above {threshold.raise_at:.0%}"
            else:
                message = f"{what} back to {value:.0%} of capacity, below {threshold.clear_at:.0%}"
            self.events.publish(
                f"alert.{change}",
                message,
                resource=resource,
                value=round(value, 4),
                raise_at=threshold.raise_at,
                clear_at=threshold.clear_at,
            )

    def alert_views(self) -> list[AlertView]:
        return [
            AlertView(
                resource=name,
                active=self.alert_states[name].active,
                since=self.alert_states[name].since,
                value=self.alert_values[name],
                raise_at=threshold.raise_at,
                clear_at=threshold.clear_at,
            )
            for name, threshold in self.thresholds.items()
        ]

    # ----------------------------------------------------------------------------- views

    def allocated(self) -> Allocation:
        return self.store.allocated()

    def available(self) -> Allocation:
        return available(self.capacity, self.store.allocated())

    def history(self, duration_s: float) -> list[NodeSample]:
        now_t = self.clock().timestamp()
        return self.store.node_samples(now_t - duration_s, now_t)

    def vm_history(self, vm_id: str, duration_s: float) -> list[VMSample]:
        now_t = self.clock().timestamp()
        return self.store.vm_samples(vm_id, now_t - duration_s, now_t)

    def latest_readings(self) -> list[Reading]:
        self._live()
        return sorted(self.latest.values(), key=lambda r: r.name)

    # ------------------------------------------------------------------------ background

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            try:
                await self.sweep()
            except Exception:  # one bad sweep must not end sampling
                log.exception("resource sampling sweep failed")
            next_at += self.cfg.interval_s
            next_at = max(next_at, loop.time())  # after a long sweep, do not catch up in bursts
            await asyncio.sleep(next_at - loop.time())


def _vm_sample(r: Reading, interval_s: float) -> VMSample:
    return VMSample(
        vm_id=r.vm_id,
        t=r.t,
        resolution_s=interval_s,
        cpu_percent=r.cpu_percent,
        memory_bytes=r.memory_bytes,
        disk_read_bytes=r.disk_read_bytes,
        disk_write_bytes=r.disk_write_bytes,
        net_rx_bytes=r.net_rx_bytes,
        net_tx_bytes=r.net_tx_bytes,
    )


#: a VM in these states may hold a VMM (error keeps its reservation until cleanup)
HOLDING_STATES = [s.value for s in ACTIVE_STATES]
FREE_STATES = [VMState.PENDING.value, VMState.STOPPED.value]


def install(services: Services, config: AgentConfig, db: Database) -> None:
    """Install the capacity gate, the sampling loop and the /metrics collector."""
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
    from stoker.services.metrics import Metrics  # metrics builds on this module

    services.extra["metrics"] = Metrics(service)
    services.background.append(service)
    psutil.cpu_percent(interval=None)  # prime the host CPU counter for the first sweep
