"""The one protocol every hypervisor driver implements.

A ``Driver`` turns a spec into a running VMM process and hands back a ``VMM`` handle: the
live connection to that one process. Drivers know nothing of policy (when to restart, what
to keep); the services decide, the drivers act. A handle can be made two ways: ``spawn`` (a
new process, our child) or ``adopt`` (a process that outlived an earlier agent).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from stoker.domain.process import ProcessRecord
from stoker.domain.spec import VMSpec


class DriverError(Exception):
    """A driver operation failed; the message says what and, where possible, what to do."""


class DriverUnavailable(DriverError):
    """The hypervisor cannot run here (binary missing, no usable KVM, ...)."""


class BootFailed(DriverError):
    """The VMM exited or never became ready."""


class NotSupported(DriverError):
    """This driver (or this VM's setup) cannot do what was asked."""


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


@runtime_checkable
class VMM(Protocol):
    """A live handle to one VMM process."""

    record: ProcessRecord
    #: the parent's view of the process (``subprocess.Popen``) when we spawned it, else None
    child: Any

    async def wait_ready(self, timeout_s: float) -> None:
        """Return once the guest is ready; raise BootFailed on timeout or VMM exit."""

    async def status(self, timeout_s: float) -> VMMStatus:
        """Ask the VMM for its state; raise DriverError if it does not answer in time."""

    async def request_shutdown(self) -> None:
        """Ask the guest to power off (ACPI power button, Ctrl-Alt-Del); do not wait."""

    async def kill(self) -> None:
        """End the VMM at once (SIGKILL); do not wait."""

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...

    async def stats(self) -> VMMStats: ...

    async def apply_io_limits(self, limits: IOLimits) -> None:
        """Apply disk and network limits the VMM enforces; raise NotSupported if it cannot."""

    async def save_state(self, dest: Path) -> None:
        """Save the memory and device state of a paused VM to ``dest`` (a file or directory)."""

    async def close(self) -> None:
        """Drop the control connection; never touches the VMM process."""


@runtime_checkable
class Driver(Protocol):
    """Makes VMM handles for one hypervisor."""

    name: str

    def check(self, spec: VMSpec) -> None:
        """Raise DriverUnavailable or NotSupported if this spec cannot run here."""

    async def spawn(self, vm_id: str, spec: VMSpec, paths: VMPaths) -> VMM:
        """Start a VMM for ``spec`` and return as soon as its pid is known."""

    async def adopt(self, spec: VMSpec, paths: VMPaths, record: ProcessRecord) -> VMM:
        """Reconnect to a VMM started earlier; raise DriverError if it is not the same one."""

    async def restore(self, vm_id: str, spec: VMSpec, paths: VMPaths, state: Path) -> VMM:
        """Start a fresh VMM from saved state ``state`` and leave it running."""
