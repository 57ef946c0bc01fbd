"""One VM's resource usage, read from the host and from the VMM.

CPU and memory come from the VMM process (QEMU and Firecracker report neither about the
guest): CPU is the change in the process's utime+stime between two sweeps, memory its
resident set. Disk counters come from the VMM (QMP query-blockstats). Network counters come
from the TAP device on the host (the operator's, or the one of the VM's managed network);
QEMU's user-mode network has no host-side counter, so it is reported as unknown with that
reason rather than as a zero that was never measured.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path

from stoker.domain import ipam
from stoker.domain.spec import NetworkMode
from stoker.domain.vm import VM
from stoker.drivers.base import VMM, DriverError, VMMStats

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
#: a VMM that does not answer block stats this fast is skipped for this sweep, not waited on
STATS_TIMEOUT_S = 2.0
#: per network namespace: what the agent's own namespace holds (sysfs shows the namespace it
#: was mounted in, which is not the agent's when it runs under ``nsenter --net``)
PROC_NET_DEV = Path("/proc/net/dev")

USER_NET_REASON = "user-mode networking has no host-side counters"


@dataclass(frozen=True)
class ProcUsage:
    """CPU ticks and resident bytes of one process, with its start time to detect pid reuse."""

    start_time: int
    cpu_ticks: int
    rss_bytes: int


def read_proc_usage(pid: int) -> ProcUsage | None:
    """Two small /proc reads; None when the process is gone (or is a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
        statm = Path(f"/proc/{pid}/statm").read_text().split()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    rest = raw[raw.rindex(")") + 2 :].split()
    if rest[0] in ("Z", "X"):
        return None
    return ProcUsage(
        start_time=int(rest[19]),
        cpu_ticks=int(rest[11]) + int(rest[12]),
        rss_bytes=int(statm[1]) * PAGE_SIZE,
    )


def read_net_dev(source: Path = PROC_NET_DEV) -> dict[str, tuple[int, int]]:
    """Every device's (guest rx, guest tx) bytes, as a TAP's guest sees them: what the host
    transmits into a TAP the guest receives."""
    try:
        lines = source.read_text().splitlines()[2:]  # two header lines
    except OSError:
        return {}
    counters = {}
    for line in lines:
        name, sep, rest = line.partition(":")
        fields = rest.split()
        if sep and len(fields) >= 9:
            host_rx, host_tx = int(fields[0]), int(fields[8])
            counters[name.strip()] = (host_tx, host_rx)
    return counters


def read_tap_counters(tap: str, source: Path = PROC_NET_DEV) -> tuple[int, int] | None:
    """(guest rx, guest tx) bytes of a TAP device, or None if it does not exist."""
    return read_net_dev(source).get(tap)


@dataclass
class Reading:
    """One VM's usage at one time; a None figure has its reason in ``unavailable``."""

    vm_id: str
    name: str
    t: float
    vcpus: int
    cpu_cores: float | None = None
    cpu_percent: float | None = None
    memory_bytes: int | None = None
    disk_read_bytes: int | None = None
    disk_write_bytes: int | None = None
    net_rx_bytes: int | None = None
    net_tx_bytes: int | None = None
    unavailable: dict[str, str] = field(default_factory=dict)


@dataclass
class _CpuMark:
    start_time: int
    ticks: int
    t: float


class VMSampler:
    """Keeps the previous CPU reading of each VMM so each sweep can turn ticks into a rate."""

    def __init__(self) -> None:
        self._marks: dict[str, _CpuMark] = {}
        #: /proc/net/dev read once per sweep (every VM of a sweep shares its time ``t``)
        self._net_dev: tuple[float, dict[str, tuple[int, int]]] | None = None

    def forget(self, vm_id: str) -> None:
        self._marks.pop(vm_id, None)

    async def sample(self, vm: VM, vmm: VMM, t: float) -> Reading:
        reading = Reading(vm_id=vm.id, name=vm.name, t=t, vcpus=vm.spec.vcpus)
        self._sample_process(reading, vmm.record.pid, vmm.record.start_time)
        await self._sample_vmm(reading, vm, vmm)
        self._sample_network(reading, vm)
        return reading

    def _sample_process(self, reading: Reading, pid: int, start_time: int) -> None:
        usage = read_proc_usage(pid)
        if usage is None or usage.start_time != start_time:
            reason = f"VMM process {pid} is gone"
            for name in ("cpu_percent", "memory_bytes"):
                reading.unavailable[name] = reason
            self.forget(reading.vm_id)
            return
        reading.memory_bytes = usage.rss_bytes
        mark = self._marks.get(reading.vm_id)
        self._marks[reading.vm_id] = _CpuMark(usage.start_time, usage.cpu_ticks, reading.t)
        if mark is None or mark.start_time != usage.start_time or reading.t <= mark.t:
            reading.unavailable["cpu_percent"] = "first reading of this VMM: CPU needs two"
            return
        cores = (usage.cpu_ticks - mark.ticks) / CLOCK_TICKS / (reading.t - mark.t)
        reading.cpu_cores = max(0.0, cores)
        reading.cpu_percent = reading.cpu_cores / max(1, reading.vcpus) * 100.0

    async def _sample_vmm(self, reading: Reading, vm: VM, vmm: VMM) -> None:
        stats: VMMStats | None = None
        try:
            stats = await asyncio.wait_for(vmm.stats(), STATS_TIMEOUT_S)
        except TimeoutError:
            reason = f"the VMM did not report stats within {STATS_TIMEOUT_S:g} s"
        except (DriverError, OSError) as exc:
            reason = f"the VMM could not report stats: {exc}"
        if stats is None:
            reading.unavailable["disk_read_bytes"] = reason
            reading.unavailable["disk_write_bytes"] = reason
            return
        if not vm.spec.drives and not stats.disks:
            reading.unavailable["disk_read_bytes"] = "no drives attached"
            reading.unavailable["disk_write_bytes"] = "no drives attached"
        else:
            reading.disk_read_bytes = sum(d.read_bytes for d in stats.disks)
            reading.disk_write_bytes = sum(d.write_bytes for d in stats.disks)
        if stats.net_rx_bytes is not None and stats.net_tx_bytes is not None:
            reading.net_rx_bytes, reading.net_tx_bytes = stats.net_rx_bytes, stats.net_tx_bytes

    def _sample_network(self, reading: Reading, vm: VM) -> None:
        if reading.net_rx_bytes is not None:
            return  # the VMM counted it itself
        network = vm.spec.network
        if network.mode == NetworkMode.USER:
            reason = USER_NET_REASON
        elif network.mode == NetworkMode.NONE:
            reason = "the VM has no network device"
        else:
            # an operator's TAP, or the one stoker made on the VM's managed network
            tap = network.tap if network.mode == NetworkMode.TAP else ipam.tap_name(vm.id)
            counters = self._tap_counters(tap or "", reading.t)
            if counters is not None:
                reading.net_rx_bytes, reading.net_tx_bytes = counters
                return
            reason = f"TAP device {tap} not found on the host"
        reading.unavailable["net_rx_bytes"] = reason
        reading.unavailable["net_tx_bytes"] = reason

    def _tap_counters(self, tap: str, t: float) -> tuple[int, int] | None:
        if self._net_dev is None or self._net_dev[0] != t:
            self._net_dev = (t, read_net_dev())
        return self._net_dev[1].get(tap)
