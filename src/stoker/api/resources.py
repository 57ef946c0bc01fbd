"""/api/v1/resources, VM metrics and /metrics (Prometheus)."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Query, Response
from pydantic import BaseModel, Field

from stoker.api.deps import services
from stoker.api.problems import PROBLEM_RESPONSES
from stoker.domain.states import VMState
from stoker.domain.units import parse_duration
from stoker.domain.usage import NodeSample, VMSample
from stoker.services.container import Services
from stoker.services.errors import InvalidSpec, ServiceError
from stoker.services.resources import ResourceService
from stoker.services.sampling import Reading

# ------------------------------------------------------------------------------ shapes

_Out = TypeVar("_Out", bound=BaseModel)

MEMORY_DOC = (
    "resident set size (RSS) of the VMM process: the guest RAM it has touched plus the "
    "VMM's own overhead, as the host sees it"
)


class CapacityOut(BaseModel):
    physical_cpus: int
    memory_bytes: int = Field(description="node memory, headroom included")
    max_vms: int
    cpu_overcommit: float
    memory_headroom: float = Field(description="fraction of memory kept free for the host")
    vcpus: int = Field(description="vCPUs VMs may reserve: physical CPUs x overcommit")
    memory_limit_bytes: int = Field(description="memory VMs may reserve: never overcommitted")
    source: dict[str, str] = Field(description="'host' (measured) or 'config' (overridden)")


class AllocationOut(BaseModel):
    vms: int
    vcpus: int
    memory_bytes: int


class UsageOut(BaseModel):
    """One VM's latest usage; a null figure is explained in ``unavailable``."""

    id: str
    name: str
    at: datetime
    vcpus: int
    cpu_percent: float | None = Field(
        description="CPU time of the VMM process, in percent of the VM's vCPUs (the VMM's own "
        "threads count, so it can pass 100)"
    )
    memory_bytes: int | None = Field(description=MEMORY_DOC)
    disk_read_bytes: int | None = Field(description="since the VMM started (QMP block stats)")
    disk_write_bytes: int | None = Field(description="since the VMM started (QMP block stats)")
    net_rx_bytes: int | None = Field(description="received by the guest (TAP counters)")
    net_tx_bytes: int | None = Field(description="sent by the guest (TAP counters)")
    unavailable: dict[str, str] = Field(description="why a figure is null, by field")


class VMAllocationOut(BaseModel):
    id: str
    name: str | None
    state: str | None
    vcpus: int
    memory_bytes: int
    reserved_at: datetime
    usage: UsageOut | None


class NodeUsageOut(BaseModel):
    at: datetime | None = Field(description="time of the last sample; null before the first")
    interval_s: float
    cpu_used_cores: float | None = Field(description="CPU cores busy in VMM processes")
    cpu_used_fraction: float | None = Field(description="cpu_used_cores / physical CPUs")
    memory_used_bytes: float | None = Field(description="sum of VMM RSS; " + MEMORY_DOC)
    memory_used_fraction: float | None = Field(description="of memory_limit_bytes")
    host_cpu_percent: float | None = Field(description="the whole host, all processes")
    host_memory_used_bytes: float | None = Field(description="the whole host: total - available")


class ConfidenceOut(BaseModel):
    samples: int
    r2: float | None
    level: str = Field(description="none, low, medium or high")


class PredictionOut(BaseModel):
    resource: str
    capacity: float
    slope_per_hour: float | None = Field(description="least-squares growth per hour")
    exhausted_in_s: float | None = Field(description="null when the series is not growing")
    exhausted_at: datetime | None
    window_s: float
    confidence: ConfidenceOut


class AlertOut(BaseModel):
    resource: str
    active: bool
    since: datetime | None
    value: float | None = Field(description="last measured fraction of capacity")
    raise_at: float
    clear_at: float


class NodePointOut(BaseModel):
    at: datetime
    resolution_s: float
    vms: float
    vcpus_allocated: float
    memory_allocated_bytes: float
    cpu_used_cores: float | None
    memory_used_bytes: float | None
    host_cpu_percent: float | None
    host_memory_used_bytes: float | None


class ResourcesOut(BaseModel):
    capacity: CapacityOut
    allocated: AllocationOut
    available: AllocationOut
    usage: NodeUsageOut
    vms: list[VMAllocationOut] = Field(description="every reservation, by VM name")
    predictions: list[PredictionOut]
    alerts: list[AlertOut]
    history_duration_s: float | None = None
    history: list[NodePointOut] | None = None


class VMPointOut(BaseModel):
    at: datetime
    resolution_s: float
    cpu_percent: float | None
    memory_bytes: float | None
    disk_read_bytes: float | None
    disk_write_bytes: float | None
    net_rx_bytes: float | None
    net_tx_bytes: float | None


class VMMetricsList(BaseModel):
    interval_s: float
    vms: list[UsageOut]


class VMMetricsOut(BaseModel):
    id: str
    name: str
    state: VMState
    interval_s: float
    latest: UsageOut | None
    latest_unavailable_reason: str | None
    history_duration_s: float
    history: list[VMPointOut]


def _at(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def _shape(model: type[_Out], record: object, **renamed: Any) -> _Out:
    """``model`` from the record's attributes of the same names, plus those named otherwise."""
    same = {name: getattr(record, name) for name in model.model_fields if hasattr(record, name)}
    return model(**{**same, **renamed})


def usage_out(r: Reading) -> UsageOut:
    return _shape(UsageOut, r, id=r.vm_id, at=_at(r.t))


def node_point(s: NodeSample) -> NodePointOut:
    return _shape(
        NodePointOut,
        s,
        at=_at(s.t),
        memory_allocated_bytes=s.memory_allocated,
        cpu_used_cores=s.cpu_used,
        memory_used_bytes=s.memory_used,
        host_memory_used_bytes=s.host_memory_used,
    )


def vm_point(s: VMSample) -> VMPointOut:
    return _shape(VMPointOut, s, at=_at(s.t))


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
        capacity=_shape(CapacityOut, cap, vcpus=cap.vcpu_limit, source=svc.capacity_source),
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
            _shape(
                VMAllocationOut,
                r,
                id=r.vm_id,
                reserved_at=r.reserved_at.replace("Z", "+00:00"),
                usage=usage_out(readings[r.vm_id]) if r.vm_id in readings else None,
            )
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


class Unavailable(ServiceError):
    status = 409
    title = "Resource tracking is not enabled"


def _installed(svc: Services, name: str) -> Any:
    """What the resources capability registered as ``name``, or a 409 saying it is off."""
    part = svc.extra.get(name)
    if part is None:
        raise Unavailable("this agent runs without the resources capability")
    return part


def _resources(svc: Services) -> ResourceService:
    return _installed(svc, "resources")  # type: ignore[no-any-return]


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
    resources = _resources(svc)
    seconds = _duration(duration)
    out = resources_out(resources)
    if history:
        out.history = [node_point(s) for s in resources.history(seconds)]
        out.history_duration_s = seconds
    return out


@router.get("/api/v1/vms/metrics", tags=["resources"], response_model=VMMetricsList)
async def list_vm_metrics(svc: Svc) -> VMMetricsList:
    """The latest usage of every sampled (running) VM."""
    resources = _resources(svc)
    return VMMetricsList(
        interval_s=resources.cfg.interval_s,
        vms=[usage_out(r) for r in resources.latest_readings()],
    )


@router.get("/api/v1/vms/{ref}/metrics", tags=["resources"], response_model=VMMetricsOut)
async def vm_metrics(ref: str, svc: Svc, duration: Duration = "1h") -> VMMetricsOut:
    """One VM's latest usage (null with a reason when it is not running) and its history."""
    resources = _resources(svc)
    seconds = _duration(duration)
    vm = svc.lifecycle.get(ref, 0)
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

    metrics = _installed(svc, "metrics")
    return Response(content=metrics.exposition(), media_type=CONTENT_TYPE)
