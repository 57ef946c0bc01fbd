"""Making each limit bind on a running VM, and reading it back.

A CPU cap and a memory limit go on the VMM's own cgroup, disk rates on a QEMU throttle group
(or Firecracker's drive limiter), network rates on tc for a QEMU TAP (or Firecracker's
interface limiter), and packets per second on a managed network's TAP with nftables (tc here
cannot count packets; a netdev chain on the TAP's ingress and egress hooks can). Every limit
is read back after it is set: a limit that does not take effect is a failure with the
reason, never a silent success.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from stoker.domain import ipam
from stoker.domain.quota import (
    CGROUP_FIELDS,
    DISK_RATE_FIELDS,
    NETWORK_FIELDS,
    Enforcement,
    Quota,
    enforceable_part,
    plan,
    vmm_enforces_network,
)
from stoker.domain.spec import NetworkMode, VMSpec
from stoker.domain.units import (
    MiB,
    mbps_to_bytes_per_s,
    tbf_burst_bytes,
    vmm_memory_limit_bytes,
)
from stoker.domain.vm import VM
from stoker.drivers.base import VMM, Capabilities, DriverError, IOLimits, Unsupported
from stoker.host import firewall, netlimits
from stoker.host.cgroups import CgroupBackend, CgroupError
from stoker.services.quotas.errors import QuotaApplyError
from stoker.services.quotas.placement import VMCgroups

log = logging.getLogger("stoker.quotas")


@dataclass
class Applied:
    """What the last application to a running VM did, per quota field."""

    at: datetime
    enforced: dict[str, str] = field(default_factory=dict)  # field -> what now binds
    failed: dict[str, str] = field(default_factory=dict)  # field -> why not
    cgroup: str | None = None


CapabilitiesOf = Callable[[VMSpec], Capabilities]


def to_io_limits(quota: Quota, caps: Capabilities) -> IOLimits:
    """The limits the VMM enforces itself. Network figures only for a VMM that limits its
    network itself: otherwise the host shapes the VM's TAP, and user-mode traffic cannot be
    shaped at all."""
    own_network = vmm_enforces_network(caps)
    return IOLimits(
        disk_iops=quota.disk_iops,
        disk_bytes_per_s=quota.disk_bytes_per_s,
        net_mbps=quota.network_mbps if own_network else None,
        net_pps=quota.network_pps if own_network else None,
    )


#: network modes whose VM has a TAP on the host
TAP_MODES = (NetworkMode.TAP, NetworkMode.MANAGED)


def _host_shapes_tap(spec: VMSpec, caps: Capabilities) -> bool:
    return spec.network.mode in TAP_MODES and not vmm_enforces_network(caps)


def _host_limits_packets(spec: VMSpec, caps: Capabilities) -> bool:
    """Only on a managed network's TAP, which stoker made (an operator's own TAP keeps the
    plan's refusal, which names the alternative)."""
    return spec.network.mode == NetworkMode.MANAGED and not vmm_enforces_network(caps)


def tap_of(vm: VM) -> str:
    """The VM's TAP on the host: the operator's, or the one of its managed network."""
    if vm.spec.network.mode == NetworkMode.TAP and vm.spec.network.tap:
        return vm.spec.network.tap
    return ipam.tap_name(vm.id)


class Enforcer:
    """Applies quotas to running VMMs and remembers, per VM, what the last application did."""

    def __init__(
        self, cgroups: VMCgroups, overhead_bytes: int, capabilities_of: CapabilitiesOf
    ) -> None:
        self.cgroups = cgroups
        self.overhead_bytes = overhead_bytes
        self.capabilities_of = capabilities_of
        #: vm_id -> the last application (kept when it failed: the view shows why)
        self.last: dict[str, Applied] = {}

    def forget(self, vm_id: str) -> None:
        self.last.pop(vm_id, None)

    def placed_cgroups(self, vm_id: str) -> CgroupBackend | None:
        """The cgroup backend, if this VM's VMM was put in its cgroup."""
        applied = self.last.get(vm_id)
        return self.cgroups.backend if applied is not None and applied.cgroup else None

    async def place_early(self, vm: VM, spec: VMSpec, quota: Quota, pid: int) -> None:
        """Move a just-spawned VMM into its cgroup with the CPU and memory limits set.

        Failures are only logged: ``apply`` runs again once the VMM is up and reports them.
        """
        quota = enforceable_part(quota, plan(quota, spec, self.capabilities_of(spec)))
        probe = Applied(at=datetime.now(UTC))
        try:
            await asyncio.to_thread(self.cgroups.place, vm.id, pid)
            await asyncio.to_thread(self._apply_cgroup, vm, quota, probe)
        except (CgroupError, ValueError) as exc:
            log.warning("could not place VMM %s in its cgroup at spawn: %s", pid, exc)

    async def apply(self, vm: VM, vmm: VMM, quota: Quota, place: bool = False) -> Applied:
        """Make every enforceable limit of ``quota`` bind on the running VM, then read it back.

        Fields the VM setup cannot enforce are skipped here (explicit requests for them are
        refused earlier). Raises QuotaApplyError naming each limit that did not take effect.
        """
        spec = vm.spec
        caps = self.capabilities_of(spec)
        enforcement = plan(quota, spec, caps)
        quota = enforceable_part(quota, enforcement)
        applied = Applied(at=datetime.now(UTC))
        self.last[vm.id] = applied
        if place:
            try:
                applied.cgroup = await asyncio.to_thread(self.cgroups.place, vm.id, vmm.record.pid)
            except (CgroupError, ValueError) as exc:
                reason = f"cannot put the VMM (pid {vmm.record.pid}) in its cgroup: {exc}"
                for name in CGROUP_FIELDS:
                    if getattr(quota, name) is not None:
                        applied.failed[name] = reason
        else:
            applied.cgroup = self.cgroups.path(vm.id)
        if applied.cgroup is not None:
            await asyncio.to_thread(self._apply_cgroup, vm, quota, applied)
        await _apply_vmm_limits(vm, vmm, quota, caps, enforcement, applied)
        if _host_shapes_tap(spec, caps):
            await asyncio.to_thread(_shape_tap, vm, quota, applied)
        if _host_limits_packets(spec, caps):
            await asyncio.to_thread(_limit_packets, vm, quota, applied)
        if quota.disk_gib is not None:
            applied.enforced["disk_gib"] = enforcement.enforced["disk_gib"]
        if applied.failed:
            raise QuotaApplyError(applied.failed)
        return applied

    def _apply_cgroup(self, vm: VM, quota: Quota, applied: Applied) -> None:
        cg = self.cgroups.open()
        try:
            cg.set_cpu_percent(vm.id, quota.cpu_percent)
            if quota.cpu_percent is not None:
                applied.enforced["cpu_percent"] = (
                    f"{cg.mode} cgroup CPU cap {quota.cpu_percent}% of one core"
                )
        except (CgroupError, ValueError) as exc:
            _fail_or_log(applied, "cpu_percent", quota.cpu_percent, exc)
        limit = (
            vmm_memory_limit_bytes(vm.spec.memory_mib, self.overhead_bytes)
            if quota.memory_mib is not None
            else None
        )
        try:
            cg.set_memory(vm.id, max_bytes=limit, high_bytes=None)
            if limit is not None:
                applied.enforced["memory_mib"] = (
                    f"{cg.mode} cgroup memory limit {limit // MiB} MiB "
                    f"(guest {vm.spec.memory_mib} MiB + VMM overhead {self.overhead_bytes // MiB})"
                )
        except (CgroupError, ValueError) as exc:
            _fail_or_log(applied, "memory_mib", limit, exc)


async def _apply_vmm_limits(
    vm: VM,
    vmm: VMM,
    quota: Quota,
    caps: Capabilities,
    enforcement: Enforcement,
    applied: Applied,
) -> None:
    """Disk rates (and network rates, for a VMM that limits them) are enforced by the VMM
    itself, which reads them back."""
    spec = vm.spec
    own_network = spec.network.mode in TAP_MODES and vmm_enforces_network(caps)
    fields = [
        *(DISK_RATE_FIELDS if spec.drives and caps.disk_throttle else ()),
        *(NETWORK_FIELDS if own_network else ()),
    ]
    if not fields:
        return
    wanted = [name for name in fields if getattr(quota, name) is not None]
    try:
        await vmm.apply_io_limits(to_io_limits(quota, caps))
    except (DriverError, Unsupported) as exc:
        for name in wanted:
            applied.failed[name] = str(exc)
        return
    for name in wanted:
        applied.enforced[name] = f"{enforcement.enforced[name]}: {getattr(quota, name)}"


def _shape_tap(vm: VM, quota: Quota, applied: Applied) -> None:
    """tc tbf on a QEMU TAP in both directions, checked against what the kernel shows."""
    tap = tap_of(vm)
    try:
        if quota.network_mbps is None:
            netlimits.clear_limits(tap)
            return
        rate = mbps_to_bytes_per_s(quota.network_mbps)
        burst = tbf_burst_bytes(rate)
        shaped = netlimits.shape_tap(tap, rate, rate, burst)
        seen = netlimits.read_qdisc(tap)
    except (netlimits.NetLimitError, ValueError, OSError) as exc:
        if quota.network_mbps is not None:
            applied.failed["network_mbps"] = str(exc)
        return
    if not (shaped.guest_rx and shaped.guest_tx):
        applied.failed["network_mbps"] = f"TAP {tap} only partly shaped: {shaped.note}"
    elif seen.get("rate") != rate or seen.get("ifb", {}).get("rate") != rate:
        applied.failed["network_mbps"] = f"the kernel shows {seen} on {tap}, not {rate} B/s"
    else:
        applied.enforced["network_mbps"] = (
            f"tc tbf {rate} B/s (burst {burst} B) on {tap} and its ifb, both directions"
        )


def _limit_packets(vm: VM, quota: Quota, applied: Applied) -> None:
    """nftables packet limits on a managed TAP, both directions, read back from the kernel's
    ruleset; no quota removes them."""
    tap = tap_of(vm)
    pps = quota.network_pps
    wanted = firewall.TapLimits(vm.id, tap, guest_rx_pps=pps, guest_tx_pps=pps)
    rules = firewall.Firewall()
    try:
        rules.set_limits(wanted)
        seen = rules.state().limits_of(vm.id)
    except firewall.FirewallError as exc:
        _fail_or_log(applied, "network_pps", pps, exc)
        return
    if pps is None:
        return
    if seen != [wanted]:
        applied.failed["network_pps"] = (
            f"nftables shows {seen} for {tap}, not {pps} packets/s in each direction"
        )
    else:
        applied.enforced["network_pps"] = (
            f"nftables limit {pps} packets/s on {tap}, each direction (netdev ingress and egress)"
        )


def _fail_or_log(applied: Applied, name: str, value: Any, exc: Exception) -> None:
    """A limit that was asked for and failed is an error; failing to clear one is a warning."""
    if value is not None:
        applied.failed[name] = str(exc)
    else:
        log.warning("could not clear %s: %s", name, exc)
