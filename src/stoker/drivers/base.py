"""The one protocol every hypervisor driver implements.

A ``Driver`` turns a spec into a running VMM process and hands back a ``VMM`` handle: the
live connection to that one process. Drivers know nothing of policy (when to restart, what
to keep); the services decide, the drivers act. A handle can be made two ways: ``spawn`` (a
new process, our child) or ``adopt`` (a process that outlived an earlier agent).

Everything a service does to a VMM is a method here; what a driver cannot do it declares in
``capabilities`` and refuses with :class:`~stoker.domain.capabilities.Unsupported`. Services
never reach past this protocol to a driver's own members.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol, runtime_checkable

from stoker.domain.capabilities import Capabilities, Unsupported
from stoker.domain.process import ProcessRecord
from stoker.domain.spec import VMSpec
from stoker.host.proc import ExitStatus

__all__ = [
    "VMM",
    "BootFailed",
    "BootOptions",
    "Capabilities",
    "DiskStats",
    "DriveThrottle",
    "Driver",
    "DriverError",
    "DriverUnavailable",
    "ExitSignal",
    "IOLimits",
    "NetAttachment",
    "ProcessRecord",
    "Unsupported",
    "VMIdentity",
    "VMMStats",
    "VMMStatus",
    "VMPaths",
]


class DriverError(Exception):
    """A driver operation failed; the message says what and, where possible, what to do."""


class DriverUnavailable(DriverError):
    """The hypervisor cannot run here (binary missing, no usable KVM, ...)."""


class BootFailed(DriverError):
    """The VMM exited or never became ready."""


@dataclass(frozen=True)
class VMPaths:
    """Where one VM's files live; every path stays under the VM's own directory."""

    root: Path

    @property
    def console(self) -> Path:
        return self.root / "console.log"

    @property
    def vmm_log(self) -> Path:
        return self.root / "vmm.log"

    @property
    def control_socket(self) -> Path:
        return self.root / "control.sock"

    @property
    def agent_socket(self) -> Path:
        """The host end of the guest agent channel (``org.qemu.guest_agent.0``)."""
        return self.root / "agent.sock"

    @property
    def pidfile(self) -> Path:
        return self.root / "vmm.pid"

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"


@dataclass(frozen=True)
class VMMStatus:
    """What the VMM says about itself when asked (QMP query-status, Firecracker GET /)."""

    running: bool
    status: str  # hypervisor's own word: "running", "paused", "Running", ...


@dataclass(frozen=True)
class DiskStats:
    device: str
    read_bytes: int
    write_bytes: int
    read_ops: int
    write_ops: int


@dataclass(frozen=True)
class VMMStats:
    """Counters the VMM itself can report; CPU and memory come from the host instead."""

    disks: tuple[DiskStats, ...] = ()
    net_rx_bytes: int | None = None
    net_tx_bytes: int | None = None


@dataclass(frozen=True)
class IOLimits:
    """Limits the VMM enforces itself (disk throttling, rate limiters); 0 or None means none."""

    disk_iops: int | None = None
    disk_bytes_per_s: int | None = None
    net_mbps: float | None = None
    net_pps: int | None = None


@dataclass(frozen=True)
class DriveThrottle:
    """The disk limits a VMM reports in force on one drive (0 means none)."""

    device: str
    iops: int
    bytes_per_s: int
    group: str | None = None


@dataclass(frozen=True)
class NetAttachment:
    """The VM's NIC on a managed network, made ready by the network service before launch."""

    #: the TAP device on the network's bridge, owned by the VM's uid
    tap: str
    mac: str
    #: the address the network's DHCP server hands this MAC, and the network's gateway
    address: str
    gateway: str
    network: str


@dataclass(frozen=True)
class VMIdentity:
    """The unprivileged user and group one VM's VMM runs as (its own, from a range)."""

    uid: int
    gid: int


@dataclass(frozen=True)
class BootOptions:
    """What the services decide for a launch beyond the spec itself."""

    #: limits a VMM takes only in its boot configuration (Firecracker's rate limiters)
    io_limits: IOLimits | None = None
    #: the NIC of a VM on a managed network (spec network mode 'managed')
    network: NetAttachment | None = None
    #: who the VMM runs as when confinement is on
    identity: VMIdentity | None = None
    #: directories of the VM's own files the launch may use besides the image pools (the
    #: copies a snapshot verification boots from)
    private_dirs: tuple[Path, ...] = ()
    #: a restore that does not run by then fails (a warm start then boots cold)
    restore_timeout_s: float = 60.0
    #: False: a restore stays paused, for a caller that resumes it once it has checked
    #: what it restored (a warm start verifies the boot snapshot's checksum meanwhile)
    resume_restored: bool = True


class ExitSignal(Protocol):
    """Resolves when the VMM process has exited (a pidfd for real processes)."""

    @property
    def exited(self) -> asyncio.Future[ExitStatus]: ...

    def cancel(self) -> None:
        """Stop watching without touching the process."""


@runtime_checkable
class VMM(Protocol):
    """A live handle to one VMM process."""

    @property
    def record(self) -> ProcessRecord: ...

    @property
    def child(self) -> subprocess.Popen[bytes] | None:
        """The parent's view of the process when we spawned it, else None (adopted)."""

    def exit_signal(self) -> ExitSignal:
        """The watch on this process's exit; the same object on every call."""

    async def wait_ready(self, timeout_s: float) -> None:
        """Return once the guest is ready; raise BootFailed on timeout or VMM exit."""

    async def status(self, timeout_s: float) -> VMMStatus:
        """Ask the VMM for its state; raise DriverError if it does not answer in time."""

    def powered_off_by_guest(self) -> bool:
        """True once the VMM has said the guest itself asked to power off (not a crash)."""

    async def request_shutdown(self) -> None:
        """Ask the guest to power off (ACPI power button, Ctrl-Alt-Del); do not wait."""

    async def kill(self) -> None:
        """End the VMM at once (SIGKILL); do not wait."""

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...

    async def stats(self) -> VMMStats: ...

    async def apply_io_limits(self, limits: IOLimits) -> None:
        """Apply disk and network limits the VMM enforces, then read them back; raise
        DriverError if what the VMM reports differs, Unsupported if it cannot."""

    async def io_limits_in_force(self) -> tuple[DriveThrottle, ...]:
        """What the VMM reports enforcing on each drive right now."""

    async def save_state(self, dest: Path) -> None:
        """Save the memory and device state of a paused VM to ``dest`` (a file or directory)."""

    async def sync_guest_clock(self, now: datetime, timeout_s: float) -> None:
        """Tell a guest resumed from saved state the time (its clock stopped when the state
        was saved): QEMU's guest agent ``guest-set-time``. Raises Unsupported when the VMM
        has no channel to the guest, DriverError when the guest does not answer."""

    async def cancel_state_save(self) -> bool:
        """Cancel a state save left running (by an agent that died mid-snapshot); True if
        one was running."""

    async def close(self) -> None:
        """Drop the control connection and stop watching; never touches the VMM process."""


#: awaited by a driver the moment a VMM process exists (see ``Driver.spawn``)
Launched = Callable[[VMM], Awaitable[None]]


@runtime_checkable
class Driver(Protocol):
    """Makes VMM handles for one hypervisor."""

    @property
    def name(self) -> str: ...

    @property
    def capabilities(self) -> Capabilities: ...

    def check(self, spec: VMSpec) -> None:
        """Raise DriverUnavailable or Unsupported if this spec cannot run here."""

    async def spawn(
        self,
        vm_id: str,
        spec: VMSpec,
        paths: VMPaths,
        boot: BootOptions,
        launched: Launched | None = None,
    ) -> VMM:
        """Start a VMM for ``spec`` and return as soon as its pid is known. ``launched`` is
        awaited the moment the process exists, before the guest touches its memory (its pid
        written down, the process placed in its cgroup); if it raises, the VMM is ended."""

    async def adopt(self, spec: VMSpec, paths: VMPaths, record: ProcessRecord) -> VMM:
        """Reconnect to a VMM started earlier; raise DriverError if it is not the same one."""

    async def restore(
        self,
        vm_id: str,
        spec: VMSpec,
        paths: VMPaths,
        state: Path,
        boot: BootOptions,
        launched: Launched | None = None,
    ) -> VMM:
        """Start a fresh VMM from saved state ``state`` and leave it running (paused, with
        ``boot.resume_restored`` False). ``launched`` as for :meth:`spawn`, before the driver
        asks for the state to be loaded (QEMU reads an ``-incoming`` descriptor on its own
        once initialised, which is later than a placement awaited here)."""

    def orphan(self, vm_id: str, paths: VMPaths) -> ProcessRecord | None:
        """A VMM of this VM that runs but was never recorded (the agent died right after
        spawning it), or None."""
