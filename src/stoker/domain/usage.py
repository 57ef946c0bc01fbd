"""Reservations and usage samples as records: what resource accounting, the store, reports and
the API share."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reservation:
    vm_id: str
    name: str | None
    state: str | None
    vcpus: int
    memory_bytes: int
    reserved_at: str


@dataclass(frozen=True)
class NodeSample:
    """Node totals at one time: allocations, and what the VMMs and the host really use."""

    t: float
    resolution_s: float
    vms: int
    vcpus_allocated: float
    memory_allocated: float
    cpu_used: float | None  # cores busy in VMM processes
    memory_used: float | None  # bytes resident in VMM processes
    host_cpu_percent: float | None
    host_memory_used: float | None


@dataclass(frozen=True)
class VMSample:
    vm_id: str
    t: float
    resolution_s: float
    cpu_percent: float | None
    memory_bytes: float | None
    disk_read_bytes: float | None
    disk_write_bytes: float | None
    net_rx_bytes: float | None
    net_tx_bytes: float | None
