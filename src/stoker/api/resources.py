"""/api/v1/resources, VM metrics and /metrics (Prometheus)."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response

from stoker.api.deps import services
from stoker.api.problems import PROBLEM_RESPONSES
from stoker.domain.capacity import NodeCapacity
from stoker.domain.units import parse_duration
from stoker.domain.usage import NodeSample, Reservation, VMSample
from stoker.services.container import Services
from stoker.services.errors import InvalidSpec
from stoker.services.resources import ResourceService
from stoker.services.sampling import Reading
from stoker.wire import (
    AlertOut,
    AllocationOut,
    CapacityOut,
    ConfidenceOut,
    NodePointOut,
    NodeUsageOut,
    PredictionOut,
    ResourcesOut,
    UsageOut,
    VMAllocationOut,
    VMMetricsList,
    VMMetricsOut,
    VMPointOut,
)


def _at(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def usage_out(r: Reading) -> UsageOut:
    return UsageOut(
        id=r.vm_id,
        name=r.name,
        at=_at(r.t),
        vcpus=r.vcpus,
        cpu_percent=r.cpu_percent,
        memory_bytes=r.memory_bytes,
        disk_read_bytes=r.disk_read_bytes,
        disk_write_bytes=r.disk_write_bytes,
        net_rx_bytes=r.net_rx_bytes,
        net_tx_bytes=r.net_tx_bytes,
        unavailable=r.unavailable,
    )


def node_point(s: NodeSample) -> NodePointOut:
    return NodePointOut(
        at=_at(s.t),
        resolution_s=s.resolution_s,
        vms=s.vms,
        vcpus_allocated=s.vcpus_allocated,
        memory_allocated_bytes=s.memory_allocated,
        cpu_used_cores=s.cpu_used,
        memory_used_bytes=s.memory_used,
        host_cpu_percent=s.host_cpu_percent,
        host_memory_used_bytes=s.host_memory_used,
    )


def vm_point(s: VMSample) -> VMPointOut:
    return VMPointOut(
        at=_at(s.t),
        resolution_s=s.resolution_s,
        cpu_percent=s.cpu_percent,
        memory_bytes=s.memory_bytes,
        disk_read_bytes=s.disk_read_bytes,
        disk_write_bytes=s.disk_write_bytes,
        net_rx_bytes=s.net_rx_bytes,
        net_tx_bytes=s.net_tx_bytes,
    )


def capacity_out(cap: NodeCapacity, source: dict[str, str]) -> CapacityOut:
    return CapacityOut(
        physical_cpus=cap.physical_cpus,
        memory_bytes=cap.memory_bytes,
        max_vms=cap.max_vms,
        cpu_overcommit=cap.cpu_overcommit,
        memory_headroom=cap.memory_headroom,
        vcpus=cap.vcpu_limit,
        memory_limit_bytes=cap.memory_limit_bytes,
        source=source,
    )


def reservation_out(r: Reservation, usage: UsageOut | None) -> VMAllocationOut:
    return VMAllocationOut(
        id=r.vm_id,
        name=r.name,
        state=r.state,
        vcpus=r.vcpus,
        memory_bytes=r.memory_bytes,
        reserved_at=datetime.fromisoformat(r.reserved_at.replace("Z", "+00:00")),
        usage=usage,
    )


def _fraction(value: float | None, of: float) -> float | None:
    return value / of if value is not None and of > 0 else None


def resources_out(svc: ResourceService) -> ResourcesOut:
    cap = svc.capacity
    allocated = svc.allocated()
    free = svc.available()
    node = svc.latest_node
    readings = {r.vm_id: r for r in svc.latest_readings()}
    now_t = svc.clock().timestamp()
    capacities = svc.capacities()
    return ResourcesOut(
        capacity=capacity_out(cap, svc.capacity_source),
        allocated=AllocationOut(**asdict(allocated)),
        available=AllocationOut(**asdict(free)),
        usage=NodeUsageOut(
            at=_at(node.t) if node else None,
            interval_s=svc.cfg.interval_s,
            cpu_used_cores=node.cpu_used if node else None,
            cpu_used_fraction=_fraction(node.cpu_used, cap.physical_cpus) if node else None,
            memory_used_bytes=node.memory_used if node else None,
            memory_used_fraction=(
                _fraction(node.memory_used, cap.memory_limit_bytes) if node else None
            ),
            host_cpu_percent=node.host_cpu_percent if node else None,
            host_memory_used_bytes=node.host_memory_used if node else None,
        ),
        vms=[
            reservation_out(r, usage_out(readings[r.vm_id]) if r.vm_id in readings else None)
            for r in svc.store.reservations()
        ],
        predictions=[
            PredictionOut(
                resource=p.resource,
                capacity=capacities[p.resource],
                slope_per_hour=p.slope_per_hour,
                exhausted_in_s=p.exhausted_in_s,
                exhausted_at=(
                    _at(now_t + p.exhausted_in_s) if p.exhausted_in_s is not None else None
                ),
                window_s=svc.cfg.prediction_window_s,
                confidence=ConfidenceOut(
                    samples=p.confidence.n, r2=p.confidence.r2, level=p.confidence.level
                ),
            )
            for p in svc.predictions
        ],
        alerts=[AlertOut(**asdict(a)) for a in svc.alert_views()],
    )


# ------------------------------------------------------------------------------ routes

router = APIRouter(responses=PROBLEM_RESPONSES)

Svc = Annotated[Services, Depends(services)]
Duration = Annotated[
    str, Query(max_length=32, description="how far back, e.g. 30m, 1h, 1d (at most the history)")
]

MAX_DURATION_S = 90 * 86_400.0


def _duration(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise InvalidSpec("duration", str(exc)) from None
    if not 0 < seconds <= MAX_DURATION_S:
        raise InvalidSpec("duration", f"must be more than 0 and at most 90d, got {text!r}")
    return seconds


@router.get("/api/v1/resources", tags=["resources"], response_model=ResourcesOut)
async def get_resources(
    svc: Svc,
    history: Annotated[bool, Query(description="include node samples over `duration`")] = False,
    duration: Duration = "1h",
) -> ResourcesOut:
    """Capacity, reservations per VM, what is free, measured usage, predictions, alerts."""
    resources = svc.resources
    seconds = _duration(duration)
    out = resources_out(resources)
    if history:
        out.history = [node_point(s) for s in resources.history(seconds)]
        out.history_duration_s = seconds
    return out


@router.get("/api/v1/vms/metrics", tags=["resources"], response_model=VMMetricsList)
async def list_vm_metrics(svc: Svc) -> VMMetricsList:
    """The latest usage of every sampled (running) VM."""
    resources = svc.resources
    return VMMetricsList(
        interval_s=resources.cfg.interval_s,
        vms=[usage_out(r) for r in resources.latest_readings()],
    )


@router.get("/api/v1/vms/{ref}/metrics", tags=["resources"], response_model=VMMetricsOut)
async def vm_metrics(ref: str, svc: Svc, duration: Duration = "1h") -> VMMetricsOut:
    """One VM's latest usage (null with a reason when it is not running) and its history."""
    resources = svc.resources
    seconds = _duration(duration)
    vm = svc.directory.get(ref, 0)
    resources.latest_readings()
    reading = resources.latest.get(vm.id)
    return VMMetricsOut(
        id=vm.id,
        name=vm.name,
        state=vm.state,
        interval_s=resources.cfg.interval_s,
        latest=usage_out(reading) if reading else None,
        latest_unavailable_reason=None
        if reading
        else f"{vm.name} is {vm.state.value}: only running VMs are sampled",
        history_duration_s=seconds,
        history=[vm_point(s) for s in resources.vm_history(vm.id, seconds)],
    )


@router.get(
    "/metrics",
    tags=["resources"],
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
async def prometheus_metrics(svc: Svc) -> Response:
    """Prometheus exposition (text format 0.0.4)."""
    from stoker.services.metrics import CONTENT_TYPE

    return Response(content=svc.metrics.exposition(), media_type=CONTENT_TYPE)
