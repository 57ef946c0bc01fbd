"""Prometheus exposition of node capacity, allocation, per-VM usage, states, health, alerts.

A custom collector builds every family at scrape time from what the resource service already
holds (the last sweep) plus two cheap queries (reservation totals; VM names, states, restart
counts and health verdicts without decoding specs), so a scrape costs about the same with a
thousand VMs as with ten, and no metric can go stale behind the state it describes.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from stoker.domain.states import VMState

if TYPE_CHECKING:  # the resources package installs these metrics: no import cycle at run time
    from stoker.services.resources import ResourceService

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
HEALTH_VALUES = ("healthy", "unhealthy", "unknown")


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class StokerCollector(Collector):
    def __init__(self, resources: ResourceService) -> None:
        self.resources = resources

    def collect(self) -> Iterator[Metric]:
        yield from self._node()
        yield from self._vms()
        yield from self._usage()
        yield from self._alerts_and_predictions()

    def _node(self) -> Iterator[Metric]:
        svc = self.resources
        cap = svc.capacity
        allocated = svc.allocated()
        free = svc.available()
        yield _gauge("stoker_node_cpus", "Physical CPUs of the node.", cap.physical_cpus)
        yield _gauge(
            "stoker_node_memory_bytes", "Memory of the node, headroom included.", cap.memory_bytes
        )
        for kind, (total, used, left) in {
            "vms": (cap.max_vms, allocated.vms, free.vms),
            "vcpus": (cap.vcpu_limit, allocated.vcpus, free.vcpus),
            "memory_bytes": (cap.memory_limit_bytes, allocated.memory_bytes, free.memory_bytes),
        }.items():
            yield _gauge(
                f"stoker_node_capacity_{kind}",
                f"What VMs may reserve ({kind}), after overcommit and headroom.",
                total,
            )
            yield _gauge(f"stoker_node_allocated_{kind}", f"Reserved by VMs ({kind}).", used)
            yield _gauge(f"stoker_node_available_{kind}", f"Still free to reserve ({kind}).", left)
        node = svc.latest_node
        if node is not None:
            if node.cpu_used is not None:
                yield _gauge(
                    "stoker_node_cpu_used_cores", "CPU cores busy in VMM processes.", node.cpu_used
                )
            if node.memory_used is not None:
                yield _gauge(
                    "stoker_node_memory_used_bytes",
                    "Resident memory of all VMM processes.",
                    node.memory_used,
                )
        if svc.last_sweep_wall_s is not None:
            yield _gauge(
                "stoker_sampling_sweep_seconds",
                "Wall time of the last resource sampling sweep.",
                svc.last_sweep_wall_s,
            )
        if svc.last_sweep_cpu_s is not None:
            yield _gauge(
                "stoker_sampling_sweep_cpu_seconds",
                "Agent CPU time (all threads) spent in the last sampling sweep.",
                svc.last_sweep_cpu_s,
            )

    def _vms(self) -> Iterator[Metric]:
        rows = self.resources.store.vm_rows()
        states = GaugeMetricFamily("stoker_vms", "VMs by state.", labels=["state"])
        counts = Counter(r.state for r in rows)
        for state in VMState:
            states.add_metric([state.value], counts.get(state.value, 0))
        yield states
        restarts = GaugeMetricFamily(
            "stoker_vm_restarts",
            "Automatic restarts in the VM's current run of failures (resets once stable).",
            labels=["vm", "id"],
        )
        health = GaugeMetricFamily(
            "stoker_vm_health",
            "1 for the VM's current health verdict (healthy, unhealthy or unknown).",
            labels=["vm", "id", "health"],
        )
        for row in rows:
            restarts.add_metric([row.name, row.id], row.restart_count)
            if row.health is not None or row.state == VMState.RUNNING.value:
                verdict = row.health or "unknown"
                for value in HEALTH_VALUES:
                    health.add_metric([row.name, row.id, value], 1.0 if verdict == value else 0.0)
        yield restarts
        yield health

    def _usage(self) -> Iterator[Metric]:
        labels = ["vm", "id"]
        cpu = GaugeMetricFamily(
            "stoker_vm_cpu_percent",
            "CPU used by the VMM process, in percent of the VM's vCPUs.",
            labels=labels,
        )
        memory = GaugeMetricFamily(
            "stoker_vm_memory_bytes",
            "Resident set size of the VMM process (guest RAM touched plus VMM overhead).",
            labels=labels,
        )
        counters = {
            "disk_read_bytes": CounterMetricFamily(
                "stoker_vm_disk_read_bytes", "Bytes read from the VM's disks.", labels=labels
            ),
            "disk_write_bytes": CounterMetricFamily(
                "stoker_vm_disk_written_bytes", "Bytes written to the VM's disks.", labels=labels
            ),
            "net_rx_bytes": CounterMetricFamily(
                "stoker_vm_network_receive_bytes", "Bytes the VM received.", labels=labels
            ),
            "net_tx_bytes": CounterMetricFamily(
                "stoker_vm_network_transmit_bytes", "Bytes the VM sent.", labels=labels
            ),
        }
        for r in self.resources.latest_readings():
            key = [r.name, r.vm_id]
            if r.cpu_percent is not None:
                cpu.add_metric(key, r.cpu_percent)
            if r.memory_bytes is not None:
                memory.add_metric(key, r.memory_bytes)
            for attr, family in counters.items():
                value = getattr(r, attr)
                if value is not None:  # unmeasurable: absent, not a made-up zero
                    family.add_metric(key, value)
        yield cpu
        yield memory
        yield from counters.values()

    def _alerts_and_predictions(self) -> Iterator[Metric]:
        active = GaugeMetricFamily(
            "stoker_alert_active", "1 while a threshold alert is raised.", labels=["resource"]
        )
        for view in self.resources.alert_views():
            active.add_metric([view.resource], 1.0 if view.active else 0.0)
        yield active
        exhaustion = GaugeMetricFamily(
            "stoker_resource_exhaustion_seconds",
            "Predicted seconds until the resource runs out (absent when it is not growing).",
            labels=["resource"],
        )
        for prediction in self.resources.predictions:
            seconds = prediction.exhausted_in_s
            if seconds is not None and math.isfinite(seconds):
                exhaustion.add_metric([prediction.resource], seconds)
        yield exhaustion


class Metrics:
    """One registry per agent (not the process-global one), so tests can run several."""

    def __init__(self, resources: ResourceService) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StokerCollector(resources))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
