"""A null hypervisor for unit tests: the Driver/VMM protocol with no process behind it.

In the spirit of ``qemu.qmp``'s ``NullProtocol``: every call is recorded, every answer and
failure is scripted, and the VMM "exits" when a test (or ``kill``) says so. The lifecycle,
recovery and quota services run against it exactly as against QEMU, so their decisions are
tested without booting anything; tests/integration proves the same paths with real guests.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from stoker.domain.capabilities import Capabilities
from stoker.domain.process import ProcessRecord
from stoker.domain.spec import VMSpec
from stoker.drivers.base import (
    BootFailed,
    BootOptions,
    DriverError,
    DriveThrottle,
    IOLimits,
    Launched,
    VMMStats,
    VMMStatus,
    VMPaths,
)
from stoker.host.proc import ExitStatus

#: pids far above pid_max (4194304): never a real process, so host checks say "gone"
_PIDS = itertools.count(5_000_000)

QEMU_LIKE = Capabilities(
    disk_throttle="fake throttle group", user_networking=True, net_rate_limit=None
)
FIRECRACKER_LIKE = Capabilities(
    disk_throttle="fake drive limiter",
    net_rate_limit="fake interface limiter",
    net_packet_limit="fake interface limiter",
)


class FakeExit:
    """The exit watch of a fake process: resolved by ``exit()``."""

    def __init__(self) -> None:
        self._future: asyncio.Future[ExitStatus] | None = None

    @property
    def exited(self) -> asyncio.Future[ExitStatus]:
        if self._future is None:  # made on first use, inside the test's event loop
            self._future = asyncio.get_running_loop().create_future()
        return self._future

    def exit(self, code: int | None = 0, sig: int | None = None) -> None:
        if not self.exited.done():
            self.exited.set_result(ExitStatus(code=code, signal=sig))

    def cancel(self) -> None:
        if self._future is not None and not self._future.done():
            self._future.cancel()


@dataclass
class FakeVMM:
    """One fake VMM; ``calls`` records every protocol call by name."""

    spec: VMSpec
    record: ProcessRecord
    child: Any = None
    #: scripted behaviour
    ready_after_s: float = 0.0
    boot_error: str | None = None
    status_error: str | None = None
    limits_error: str | None = None
    obeys_shutdown: bool = True
    #: how long the process takes to die after SIGKILL (None: never, stuck in the kernel)
    dies_after_kill_s: float | None = 0.0
    running: bool = True
    powered_off: bool = False
    #: what happened
    calls: list[str] = field(default_factory=list)
    limits: list[IOLimits] = field(default_factory=list)
    _exit: FakeExit | None = None

    def exit_signal(self) -> FakeExit:
        if self._exit is None:
            self._exit = FakeExit()
        return self._exit

    def crash(self, code: int | None = None, sig: int | None = 9) -> None:
        """The process dies on its own."""
        self.exit_signal().exit(code, sig)

    def guest_poweroff(self) -> None:
        """The guest powers itself off: the VMM says so, then exits 0."""
        self.powered_off = True
        self.exit_signal().exit(0, None)

    async def wait_ready(self, timeout_s: float) -> None:
        self.calls.append("wait_ready")
        if self.boot_error is not None:
            raise BootFailed(self.boot_error)
        if self.ready_after_s > timeout_s:
            await asyncio.sleep(timeout_s)
            raise BootFailed(f"boot timeout: not ready within {timeout_s:g} s")
        await asyncio.sleep(self.ready_after_s)

    async def status(self, timeout_s: float) -> VMMStatus:
        self.calls.append("status")
        if self.status_error is not None:
            raise DriverError(self.status_error)
        return VMMStatus(running=self.running, status="running" if self.running else "paused")

    def powered_off_by_guest(self) -> bool:
        return self.powered_off

    async def request_shutdown(self) -> None:
        self.calls.append("request_shutdown")
        if self.obeys_shutdown:
            self.guest_poweroff()

    async def kill(self) -> None:
        self.calls.append("kill")
        if self.dies_after_kill_s == 0.0:
            self.exit_signal().exit(None, 9)
        elif self.dies_after_kill_s is not None:
            loop = asyncio.get_running_loop()
            loop.call_later(self.dies_after_kill_s, self.exit_signal().exit, None, 9)

    async def pause(self) -> None:
        self.calls.append("pause")
        self.running = False

    async def resume(self) -> None:
        self.calls.append("resume")
        self.running = True

    async def stats(self) -> VMMStats:
        return VMMStats()

    async def apply_io_limits(self, limits: IOLimits) -> None:
        self.calls.append("apply_io_limits")
        if self.limits_error is not None:
            raise DriverError(self.limits_error)
        self.limits.append(limits)

    async def io_limits_in_force(self) -> tuple[DriveThrottle, ...]:
        last = self.limits[-1] if self.limits else IOLimits()
        return tuple(
            DriveThrottle(f"vd{i}", last.disk_iops or 0, last.disk_bytes_per_s or 0)
            for i, _ in enumerate(self.spec.drives)
        )

    async def save_state(self, dest: Path) -> None:
        self.calls.append("save_state")
        dest.write_bytes(b"fake memory state")

    async def sync_guest_clock(self, now: datetime, timeout_s: float) -> None:
        self.calls.append("sync_guest_clock")

    async def cancel_state_save(self) -> bool:
        self.calls.append("cancel_state_save")
        return False

    async def close(self) -> None:
        self.calls.append("close")
        if self._exit is not None:
            self._exit.cancel()


@dataclass
class FakeDriver:
    """Makes FakeVMMs; ``vmms`` keeps every one it made, newest last."""

    name: str = "qemu"
    capabilities: Capabilities = QEMU_LIKE
    #: applied to every new VMM (e.g. {"ready_after_s": 0.05})
    script: dict[str, Any] = field(default_factory=dict)
    spawn_error: str | None = None
    vmms: list[FakeVMM] = field(default_factory=list)
    boots: list[BootOptions] = field(default_factory=list)
    restored_from: list[Path] = field(default_factory=list)

    def check(self, spec: VMSpec) -> None:
        return None

    def _make(self, spec: VMSpec, paths: VMPaths) -> FakeVMM:
        if self.spawn_error is not None:
            raise DriverError(self.spawn_error)
        paths.root.mkdir(mode=0o700, parents=True, exist_ok=True)  # as a real driver does
        record = ProcessRecord(next(_PIDS), 1, str(paths.control_socket), accel="fake")
        vmm = FakeVMM(spec, record, **self.script)
        self.vmms.append(vmm)
        return vmm

    async def spawn(
        self,
        vm_id: str,
        spec: VMSpec,
        paths: VMPaths,
        boot: BootOptions,
        launched: Launched | None = None,
    ) -> FakeVMM:
        self.boots.append(boot)
        vmm = self._make(spec, paths)
        if launched is not None:
            await launched(vmm)
        return vmm

    def orphan(self, vm_id: str, paths: VMPaths) -> ProcessRecord | None:
        return None

    async def adopt(self, spec: VMSpec, paths: VMPaths, record: ProcessRecord) -> FakeVMM:
        raise DriverError(f"process {record.pid} is gone")

    async def restore(
        self,
        vm_id: str,
        spec: VMSpec,
        paths: VMPaths,
        state: Path,
        boot: BootOptions,
        launched: Launched | None = None,
    ) -> FakeVMM:
        self.boots.append(boot)
        self.restored_from.append(state)
        vmm = self._make(spec, paths)
        if launched is not None:
            await launched(vmm)
        vmm.calls.append("load_state")
        if not boot.resume_restored:
            vmm.running = False
        return vmm

    @property
    def last(self) -> FakeVMM:
        return self.vmms[-1]
