"""The resource service: samples every running VM on a timer, keeps the history, predicts
and alerts; it is also what the API and /metrics read.

Each sweep stores node and VM samples (folded into coarser buckets as they age), fits a
trend over the prediction window and re-evaluates the threshold alerts.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import UTC, datetime

import psutil

from stoker.domain import trend
from stoker.domain.capacity import Allocation, NodeCapacity, available
from stoker.domain.events import Event, EventType
from stoker.domain.states import ACTIVE_STATES, VMState
from stoker.domain.usage import NodeSample, VMSample
from stoker.domain.vm import VM
from stoker.drivers.base import VMM
from stoker.services.directory import VMDirectory
from stoker.services.events import EventBus
from stoker.services.loops import PeriodicTask
from stoker.services.resources import prediction
from stoker.services.resources.alerting import AlertView, UsageAlerts
from stoker.services.resources.config import ResourcesConfig
from stoker.services.resources.gate import CapacityGate
from stoker.services.sampling import Reading, VMSampler
from stoker.store.resources import ResourceStore

log = logging.getLogger("stoker.resources")

#: samples finer than the bucket are kept this long, then folded
RAW_KEEP_S = 3600.0
#: folded samples are this coarse (or five sampling intervals, if that is coarser)
BUCKET_S = 300.0
#: a VM in these states may hold a VMM (error keeps its reservation until cleanup)
HOLDING_STATES = [s.value for s in ACTIVE_STATES]
FREE_STATES = [VMState.PENDING.value, VMState.STOPPED.value]
#: the figures a VM sample takes over from a reading (all but its resolution)
_READING_FIGURES = [f.name for f in fields(VMSample) if f.name != "resolution_s"]


@dataclass
class _Tracked:
    vm: VM
    vmm: VMM


class ResourceService:
    """Sampling loop, history, prediction and alerts; also what the API and /metrics read."""

    def __init__(
        self,
        cfg: ResourcesConfig,
        store: ResourceStore,
        directory: VMDirectory,
        events: EventBus,
        capacity: NodeCapacity,
        capacity_source: dict[str, str],
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.directory = directory
        self.events = events
        self.capacity = capacity
        self.capacity_source = capacity_source
        self.clock = clock or (lambda: datetime.now(UTC))
        self.gate = CapacityGate(store, capacity, self.clock)
        self.sampler = VMSampler()
        self.alerts = UsageAlerts(cfg, events)
        self.latest: dict[str, Reading] = {}
        self.latest_node: NodeSample | None = None
        self.predictions: list[trend.Prediction] = []
        self.last_sweep_cpu_s: float | None = None
        self.last_sweep_wall_s: float | None = None
        self._tracked: dict[str, _Tracked] = {}
        self._sampler = PeriodicTask(
            "resource sampling", self.sweep, cfg.interval_s, fixed_rate=True
        )
        self._last_compact = 0.0
        self.bucket_s = max(BUCKET_S, 5 * cfg.interval_s)

    # ----------------------------------------------------------------------- VM tracking

    def reconcile(self) -> None:
        """Repair reservations an agent that died mid-change left inconsistent, so the gate
        starts from what is really running (called before VMs are re-adopted)."""
        dropped, added = self.store.reconcile(HOLDING_STATES, FREE_STATES, self.clock())
        if dropped or added:
            log.warning(
                "repaired reservations left by an earlier agent: dropped %d, added %d",
                dropped,
                added,
            )

    async def vmm_up(self, vm: VM, vmm: VMM) -> None:
        """A VMM became running (start, restart, re-adoption): sample it from now on."""
        self._tracked[vm.id] = _Tracked(vm, vmm)

    def on_event(self, event: Event) -> None:
        if event.type == EventType.VM_DELETED and event.vm_id:
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
            if self.directory.vmm(vm_id) is tracked.vmm:
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
        self.store.add_samples(node, [self._vm_sample(r) for r in good])
        if t - self._last_compact >= 60:
            self._last_compact = t
            self.store.compact(t, max(RAW_KEEP_S, 10 * self.cfg.interval_s), self.bucket_s,
                               self.cfg.history_s)  # fmt: skip
        self.predictions = self.predict(t)
        self.alerts.evaluate(node, self.capacity, now)
        self.last_sweep_cpu_s = time.process_time() - cpu0
        self.last_sweep_wall_s = time.perf_counter() - wall0

    def _vm_sample(self, reading: Reading) -> VMSample:
        figures = {name: getattr(reading, name) for name in _READING_FIGURES}
        return VMSample(resolution_s=self.cfg.interval_s, **figures)

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
        return prediction.capacities(self.capacity)

    def predict(self, now_t: float) -> list[trend.Prediction]:
        window = self.cfg.prediction_window_s
        samples = self.store.node_samples(now_t - window, now_t)
        return prediction.predict(samples, self.capacities(), now_t, window)

    def alert_views(self) -> list[AlertView]:
        return self.alerts.views()

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
        psutil.cpu_percent(interval=None)  # prime the host CPU counter for the first sweep
        await self._sampler.start()

    async def stop(self) -> None:
        await self._sampler.stop()
