"""When each node series (allocations, and what VMMs really use) is predicted to run out."""

from __future__ import annotations

from collections.abc import Iterable

from stoker.domain import trend
from stoker.domain.capacity import NodeCapacity
from stoker.domain.usage import NodeSample


def capacities(cap: NodeCapacity) -> dict[str, float]:
    """What each predicted series runs out against."""
    return {
        "vms_allocated": cap.max_vms,
        "cpu_allocated": cap.vcpu_limit,
        "memory_allocated": cap.memory_limit_bytes,
        "cpu_used": cap.physical_cpus,
        "memory_used": cap.memory_limit_bytes,
    }


def predict(
    samples: Iterable[NodeSample], limits: dict[str, float], now_t: float, window_s: float
) -> list[trend.Prediction]:
    """One prediction per series of ``limits``; an unmeasured figure is left out of its fit."""
    series: dict[str, list[tuple[float, float]]] = {name: [] for name in limits}
    for s in samples:
        series["vms_allocated"].append((s.t, s.vms))
        series["cpu_allocated"].append((s.t, s.vcpus_allocated))
        series["memory_allocated"].append((s.t, s.memory_allocated))
        if s.cpu_used is not None:
            series["cpu_used"].append((s.t, s.cpu_used))
        if s.memory_used is not None:
            series["memory_used"].append((s.t, s.memory_used))
    return [
        trend.predict(name, series[name], limit, now_t, window_s) for name, limit in limits.items()
    ]
