"""Per-VM quotas: what an operator may ask for, how defaults and overrides combine, and which
limits a given VM setup can actually enforce.

Pure: no I/O. The service turns an :class:`Enforcement` plan into cgroup writes, QMP
throttling, Firecracker rate limiters and tc qdiscs; this module decides what is possible,
so that a limit that cannot bind is refused (or reported as not enforced) instead of being
"applied" in name only, as the originals did.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from stoker.domain.capabilities import Capabilities
from stoker.domain.spec import NetworkMode, VMSpec
from stoker.domain.units import GiB

#: Quota fields in the order they are shown.
FIELDS = (
    "cpu_percent",
    "memory_mib",
    "disk_gib",
    "disk_iops",
    "disk_bytes_per_s",
    "network_mbps",
    "network_pps",
)
#: Limits that bind through the VMM's cgroup.
CGROUP_FIELDS = ("cpu_percent", "memory_mib")
#: Limits that bind through the VMM's disk throttling.
DISK_RATE_FIELDS = ("disk_iops", "disk_bytes_per_s")
#: Limits that bind on the VM's network interface.
NETWORK_FIELDS = ("network_mbps", "network_pps")

CPU_MIN_PERCENT = 1  # 1% of a 100 ms period is the kernel's 1 ms minimum quota
CPU_MAX_PERCENT = 100 * 1024


class Quota(BaseModel):
    """Limits for one VM; ``None`` means "no limit from this layer".

    CPU is a percentage of one core (200 = two full cores) enforced as a hard cap, memory is
    the most RAM the guest may have in MiB (the VMM process is capped at that guest's RAM plus
    the VMM's own overhead), disk size is GiB summed over the VM's drives.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    cpu_percent: int | None = Field(
        default=None,
        ge=CPU_MIN_PERCENT,
        le=CPU_MAX_PERCENT,
        description="hard CPU cap in percent of one core (200 = two cores); not a weight",
    )
    memory_mib: int | None = Field(
        default=None, gt=0, le=4 * 1024 * 1024, description="most guest RAM allowed, MiB"
    )
    disk_gib: int | None = Field(
        default=None, gt=0, le=1024 * 1024, description="total size of the VM's drives, GiB"
    )
    disk_iops: int | None = Field(
        default=None, gt=0, le=10_000_000, description="disk operations per second, whole VM"
    )
    disk_bytes_per_s: int | None = Field(
        default=None, gt=0, le=2**40, description="disk bytes per second, whole VM"
    )
    network_mbps: float | None = Field(
        default=None, gt=0, le=1_000_000, description="network bandwidth per direction, Mbps"
    )
    network_pps: int | None = Field(
        default=None, gt=0, le=100_000_000, description="network packets per second per direction"
    )

    def is_empty(self) -> bool:
        return all(getattr(self, name) is None for name in FIELDS)

    def set_fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in FIELDS if getattr(self, name) is not None}


def merge(defaults: Quota, override: Quota | None) -> Quota:
    """Per-VM values win field by field; a field the override leaves unset keeps the default."""
    if override is None:
        return defaults
    return Quota(**{**defaults.set_fields(), **override.set_fields()})


def sources(defaults: Quota, override: Quota | None) -> dict[str, str]:
    """Where each effective value comes from: "vm", "default" or "none"."""
    out = {}
    for name in FIELDS:
        if override is not None and getattr(override, name) is not None:
            out[name] = "vm"
        elif getattr(defaults, name) is not None:
            out[name] = "default"
        else:
            out[name] = "none"
    return out


@dataclass(frozen=True)
class QuotaProblem:
    field: str
    message: str


def check_fits(quota: Quota, spec: VMSpec, drive_bytes: int) -> list[QuotaProblem]:
    """What about this VM already breaks the quota (guest RAM above it, drives too big)."""
    problems = []
    if quota.memory_mib is not None and quota.memory_mib < spec.memory_mib:
        problems.append(
            QuotaProblem(
                "memory_mib",
                f"{quota.memory_mib} MiB is below the guest's RAM of {spec.memory_mib} MiB; "
                f"the quota must be at least {spec.memory_mib}",
            )
        )
    if quota.disk_gib is not None and drive_bytes > quota.disk_gib * GiB:
        problems.append(
            QuotaProblem(
                "disk_gib",
                f"the VM's drives add up to {drive_bytes / GiB:.2f} GiB, above the "
                f"{quota.disk_gib} GiB quota",
            )
        )
    return problems


# --------------------------------------------------------------------------- enforcement


@dataclass(frozen=True)
class Enforcement:
    """How each set limit of a quota binds for one VM, or why it cannot."""

    #: field -> mechanism ("cgroup cpu cap", "QEMU throttle group", ...)
    enforced: dict[str, str] = field(default_factory=dict)
    #: field -> why this VM setup cannot enforce it, and what to use instead
    unenforceable: dict[str, str] = field(default_factory=dict)


QEMU_USER_NET = (
    "QEMU user-mode networking cannot be rate-limited (its traffic never crosses a host "
    "device tc could shape); use network mode 'managed' (the default network) or network "
    "mode 'tap', where the limit is applied on the TAP device, or the firecracker hypervisor"
)
NO_NET = "the VM has no network device (network mode 'none'): there is nothing to limit"
NO_DISK_THROTTLE = "this VM's hypervisor cannot throttle its disks"
TC_NO_PPS = (
    "packets per second cannot be enforced with tc on this host (tbf and htb count bytes; a "
    "packet-rate police action needs CONFIG_NET_ACT_POLICE); use the firecracker hypervisor, "
    "whose network rate limiter has an 'ops' bucket for packets"
)


#: how each network limit binds on the TAP of a managed network, which stoker owns
MANAGED_TAP_LIMITS = {
    "network_mbps": "tc tbf on the TAP (guest receive) and its ifb (guest transmit)",
    "network_pps": "nftables packet limit in the TAP's ingress and egress hooks",
}


def plan(quota: Quota, spec: VMSpec, caps: Capabilities) -> Enforcement:
    """Decide, for what this VM's driver can do and its network mode, how each set limit is
    enforced."""
    enforced: dict[str, str] = {}
    refused: dict[str, str] = {}
    if quota.cpu_percent is not None:
        enforced["cpu_percent"] = "cgroup CPU cap (cpu.max / cpu.cfs_quota_us) on the VMM"
    if quota.memory_mib is not None:
        enforced["memory_mib"] = "cgroup memory limit on the VMM (guest RAM + VMM overhead)"
    if quota.disk_gib is not None:
        enforced["disk_gib"] = "drive sizes checked at create, start and quota change"
    for name in DISK_RATE_FIELDS:
        if getattr(quota, name) is not None:
            if caps.disk_throttle is not None:
                enforced[name] = caps.disk_throttle
            else:
                refused[name] = NO_DISK_THROTTLE
    mode = spec.network.mode
    vmm_limit = {"network_mbps": caps.net_rate_limit, "network_pps": caps.net_packet_limit}
    for name in NETWORK_FIELDS:
        if getattr(quota, name) is None:
            continue
        if mode == NetworkMode.NONE:
            refused[name] = NO_NET
        elif vmm_limit[name] is not None:
            enforced[name] = str(vmm_limit[name])
        elif mode == NetworkMode.USER:
            refused[name] = QEMU_USER_NET
        elif mode == NetworkMode.MANAGED:
            enforced[name] = MANAGED_TAP_LIMITS[name]
        elif name == "network_pps":
            refused[name] = TC_NO_PPS
        else:
            enforced[name] = "tc tbf on the TAP (guest receive) and its ifb (guest transmit)"
    return Enforcement(enforced, refused)


def vmm_enforces_network(caps: Capabilities) -> bool:
    """Network limits go to the VMM itself (else the host shapes the VM's TAP)."""
    return caps.net_rate_limit is not None


def enforceable_part(quota: Quota, enforcement: Enforcement) -> Quota:
    """The quota without the limits this VM cannot enforce."""
    kept = {k: v for k, v in quota.set_fields().items() if k not in enforcement.unenforceable}
    return Quota(**kept)


# --------------------------------------------------------------------------- violations


@dataclass(frozen=True)
class Sample:
    """Cumulative counters read at one instant (None where not available)."""

    at: float  # monotonic seconds
    cpu_usage_usec: int | None = None
    cpu_throttled: int | None = None  # periods in which the cap was hit
    memory_failcnt: int | None = None  # times usage hit the limit
    memory_oom_kills: int | None = None
    disk_ops: int | None = None
    disk_bytes: int | None = None


@dataclass(frozen=True)
class Violation:
    kind: str  # "cpu", "memory", "oom", "disk_iops", "disk_bytes_per_s"
    detail: str
    amount: float  # throttled periods, failcnt delta, ops/s, bytes/s


@dataclass(frozen=True)
class Rates:
    cpu_percent: float | None
    disk_iops: float | None
    disk_bytes_per_s: float | None


def _delta(new: int | None, old: int | None) -> int | None:
    if new is None or old is None:
        return None
    return max(0, new - old)


def rates(prev: Sample, cur: Sample) -> Rates:
    """Usage over the interval between two samples."""
    span = cur.at - prev.at
    if span <= 0:
        return Rates(None, None, None)
    cpu = _delta(cur.cpu_usage_usec, prev.cpu_usage_usec)
    ops = _delta(cur.disk_ops, prev.disk_ops)
    nbytes = _delta(cur.disk_bytes, prev.disk_bytes)
    return Rates(
        cpu_percent=None if cpu is None else cpu / 1e6 / span * 100,
        disk_iops=None if ops is None else ops / span,
        disk_bytes_per_s=None if nbytes is None else nbytes / span,
    )


def violations(
    prev: Sample, cur: Sample, quota: Quota, at_limit_ratio: float = 0.9
) -> list[Violation]:
    """What hit its limit between two samples.

    CPU: throttled periods went up (the cgroup cap held the VMM back). Memory: the limit was
    hit (failcnt) or the OOM killer ran. Disk: the measured rate reached ``at_limit_ratio`` of
    the limit, i.e. the throttle is what holds the guest back.
    """
    out = []
    throttled = _delta(cur.cpu_throttled, prev.cpu_throttled)
    if quota.cpu_percent is not None and throttled:
        out.append(
            Violation(
                "cpu",
                f"CPU cap of {quota.cpu_percent}% hit in {throttled} scheduler periods",
                throttled,
            )
        )
    failcnt = _delta(cur.memory_failcnt, prev.memory_failcnt)
    if failcnt:
        out.append(Violation("memory", f"memory limit reached {failcnt} times", failcnt))
    ooms = _delta(cur.memory_oom_kills, prev.memory_oom_kills)
    if ooms:
        out.append(Violation("oom", f"OOM killer ran {ooms} times in the VM's cgroup", ooms))
    measured = rates(prev, cur)
    for kind, limit, rate, unit in (
        ("disk_iops", quota.disk_iops, measured.disk_iops, "ops/s"),
        ("disk_bytes_per_s", quota.disk_bytes_per_s, measured.disk_bytes_per_s, "B/s"),
    ):
        if limit is not None and rate is not None and rate >= at_limit_ratio * limit:
            out.append(
                Violation(kind, f"disk at its limit: {rate:.0f} {unit} of {limit} {unit}", rate)
            )
    return out


@dataclass(frozen=True)
class ViolationCount:
    """``episodes``: separate times the limit was hit (a new one after a quiet interval);
    ``samples``: monitoring intervals spent at the limit; ``total``: the summed amounts
    (throttled periods, failcnt hits, OOM kills, ...)."""

    vm_id: str
    kind: str
    episodes: int
    samples: int
    total: float
    first_at: datetime
    last_at: datetime
    last_detail: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "episodes": self.episodes,
            "samples": self.samples,
            "total": self.total,
            "first_at": _iso(self.first_at),
            "last_at": _iso(self.last_at),
            "last_detail": self.last_detail,
        }


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
