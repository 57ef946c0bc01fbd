"""One VM's resource usage, read from the host and from the VMM.

CPU and memory come from the VMM process (QEMU and Firecracker report neither about the
guest): CPU is the change in the process's utime+stime between two sweeps, memory its
resident set. Disk counters come from the VMM (QMP query-blockstats). Network counters come
from the TAP device on the host; QEMU's user-mode network has no host-side counter, so it is
reported as unknown with that reason rather than as a zero that was never measured.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path

from stoker.domain.spec import NetworkMode
from stoker.domain.vm import VM
from stoker.drivers.base import VMM, DriverError, VMMStats

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
#: a VMM that does not answer block stats this fast is skipped for this sweep, not waited on
STATS_TIMEOUT_S = 2.0
NET_ROOT = Path("/sys/class/net")

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


def read_tap_counters(tap: str, root: Path = NET_ROOT) -> tuple[int, int] | None:
    """(guest rx, guest tx) bytes of a TAP device, or None if it does not exist.

    The host's view is mirrored: what the host transmits into the TAP the guest receives.
    """
    stats = root / tap / "statistics"
    try:
        host_tx = int((stats / "tx_bytes").read_text())
        host_rx = int((stats / "rx_bytes").read_text())
    except (FileNotFoundError, ValueError):
        return None
    return host_tx, host_rx


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
            counters = read_tap_counters(network.tap or "")
            if counters is not None:
                reading.net_rx_bytes, reading.net_tx_bytes = counters
                return
            reason = f"TAP device {network.tap} not found on the host"
        reading.unavailable["net_rx_bytes"] = reason
        reading.unavailable["net_tx_bytes"] = reason
