"""Node capacity and reservation arithmetic.

Admission is a pure question (does this request fit on top of what is already reserved?) so
that the service layer can hold one lock, ask it, and reserve in the same step. CPU may be
overcommitted (vCPUs time-share physical cores); memory never is, and a fraction of it stays
free for the host and the VMMs' own overhead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from stoker.domain.units import MiB

Resource = Literal["vms", "vcpus", "memory"]


@dataclass(frozen=True)
class NodeCapacity:
    """What a node may hand out. Defaults follow the seed: 50 VMs, 2x CPU overcommit."""

    physical_cpus: int
    memory_bytes: int
    max_vms: int = 50
    cpu_overcommit: float = 2.0
    memory_headroom: float = 0.20

    def __post_init__(self) -> None:
        if self.physical_cpus < 1:
            raise ValueError(f"physical_cpus must be at least 1, got {self.physical_cpus}")
        if self.memory_bytes < 0:
            raise ValueError(f"memory_bytes must not be negative, got {self.memory_bytes}")
        if self.max_vms < 0:
            raise ValueError(f"max_vms must not be negative, got {self.max_vms}")
        if not (math.isfinite(self.cpu_overcommit) and self.cpu_overcommit > 0):
            raise ValueError(f"cpu_overcommit must be positive, got {self.cpu_overcommit}")
        if not 0 <= self.memory_headroom < 1:
            raise ValueError(f"memory_headroom is a fraction in [0, 1), got {self.memory_headroom}")

    @property
    def vcpu_limit(self) -> int:
        """floor(physical CPUs x overcommit); the epsilon keeps 3 x 0.7 from becoming 2."""
        return math.floor(self.physical_cpus * self.cpu_overcommit + 1e-9)

    @property
    def memory_limit_bytes(self) -> int:
        """Memory that guests may reserve: the rest is the host's headroom, never lent out."""
        return math.floor(self.memory_bytes * (1.0 - self.memory_headroom))


@dataclass(frozen=True)
class Request:
    """What one VM asks for."""

    vcpus: int
    memory_bytes: int

    def __post_init__(self) -> None:
        if self.vcpus < 0 or self.memory_bytes < 0:
            raise ValueError("a request cannot ask for negative vCPUs or memory")


@dataclass(frozen=True)
class Allocation:
    """Totals currently reserved on a node (or, from available(), still free)."""

    vms: int = 0
    vcpus: int = 0
    memory_bytes: int = 0

    def __post_init__(self) -> None:
        if self.vms < 0 or self.vcpus < 0 or self.memory_bytes < 0:
            raise ValueError(f"an allocation cannot be negative: {self}")


def _mib(n: int) -> str:
    return f"{n // MiB} MiB"


def _mib_up(n: int) -> str:
    return f"{-(-n // MiB)} MiB"


@dataclass(frozen=True)
class Shortfall:
    """Why a request does not fit: the first resource that ran out and by how much."""

    resource: Resource
    requested: int
    available: int
    limit: int
    detail: str = ""

    def message(self) -> str:
        """One sentence an operator can act on: what was asked, what is free, of what."""
        if self.resource == "memory":
            text = (
                f"not enough memory: asked for {_mib_up(self.requested)}, "
                f"{_mib(self.available)} free of {_mib(self.limit)}"
            )
        elif self.resource == "vcpus":
            text = (
                f"not enough vCPUs: asked for {self.requested}, "
                f"{self.available} free of {self.limit}"
            )
        else:
            text = f"no room for another VM: all {self.limit} VM slots are in use"
        return f"{text} ({self.detail})" if self.detail else text


def available(cap: NodeCapacity, allocated: Allocation) -> Allocation:
    """What is still free; zero (never negative) when a shrunk capacity is over-reserved."""
    return Allocation(
        vms=max(0, cap.max_vms - allocated.vms),
        vcpus=max(0, cap.vcpu_limit - allocated.vcpus),
        memory_bytes=max(0, cap.memory_limit_bytes - allocated.memory_bytes),
    )


def shortfalls(cap: NodeCapacity, allocated: Allocation, req: Request) -> list[Shortfall]:
    """Every resource the request does not fit in, in the order vms, vcpus, memory."""
    free = available(cap, allocated)
    out: list[Shortfall] = []
    if free.vms < 1:
        out.append(Shortfall("vms", 1, free.vms, cap.max_vms, "node setting max_vms"))
    if req.vcpus > free.vcpus:
        out.append(
            Shortfall(
                "vcpus",
                req.vcpus,
                free.vcpus,
                cap.vcpu_limit,
                f"{cap.physical_cpus} physical CPUs x {cap.cpu_overcommit:g} overcommit",
            )
        )
    if req.memory_bytes > free.memory_bytes:
        out.append(
            Shortfall(
                "memory",
                req.memory_bytes,
                free.memory_bytes,
                cap.memory_limit_bytes,
                f"host headroom {cap.memory_headroom:.0%} kept free",
            )
        )
    return out


def check_fit(cap: NodeCapacity, allocated: Allocation, req: Request) -> Shortfall | None:
    """None when the request fits exactly (a request equal to what is free fits)."""
    found = shortfalls(cap, allocated, req)
    return found[0] if found else None


def reserve(allocated: Allocation, req: Request) -> Allocation:
    """Add one VM's request. Does not check capacity: call check_fit under the same lock."""
    return Allocation(
        vms=allocated.vms + 1,
        vcpus=allocated.vcpus + req.vcpus,
        memory_bytes=allocated.memory_bytes + req.memory_bytes,
    )


def release(allocated: Allocation, req: Request) -> Allocation:
    """Remove one VM's request; releasing more than is reserved is a bookkeeping bug."""
    if (
        allocated.vms < 1
        or req.vcpus > allocated.vcpus
        or req.memory_bytes > allocated.memory_bytes
    ):
        raise ValueError(
            f"cannot release {req} from {allocated}: more than is reserved "
            "(a VM released twice, or released without being reserved)"
        )
    return Allocation(
        vms=allocated.vms - 1,
        vcpus=allocated.vcpus - req.vcpus,
        memory_bytes=allocated.memory_bytes - req.memory_bytes,
    )
