"""Node capacity, reservations, usage, history, predictions and alerts as the API shows them."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from stoker.domain.states import VMState

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
