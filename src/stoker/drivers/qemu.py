"""QEMU microVMs driven over QMP.

The VMM runs in its own session with its console and its own output in files under the VM's
directory, so it outlives the agent; by default it runs confined (its own uid, a private
mount namespace with nothing of the host's, no capabilities, seccomp) and gets descriptors,
never paths (:mod:`.qemu_launch`). The agent keeps one QMP connection per VM: commands go
through it, and the SHUTDOWN event tells a guest power-off from a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError

from stoker.domain.spec import Accel, VMSpec
from stoker.drivers.base import (
    BootFailed,
    BootOptions,
    Capabilities,
    DiskStats,
    DriverError,
    DriverUnavailable,
    DriveThrottle,
    IOLimits,
    Launched,
    ProcessRecord,
    Unsupported,
    VMMStats,
    VMMStatus,
    VMPaths,
)
from stoker.drivers.qemu_argv import process_tag
from stoker.drivers.qemu_launch import LaunchSettings, PreparedLaunch, check_images, prepare
from stoker.host import kvm
from stoker.host.confine import minimal_env
from stoker.host.proc import (
    ExitWatch,
    find_processes_with_arg,
    is_same_live_process,
    read_start_time,
    spawn_detached,
)
from stoker.host.tsc import host_tsc_khz

log = logging.getLogger("stoker.qemu")

CONSOLE_POLL_S = 0.005
QMP_CONNECT_POLL_S = 0.005


CAPABILITIES = Capabilities(
    graceful_stop=True,
    pause=True,
    memory_snapshot=True,
    disk_throttle="QEMU throttle group over all drives (QMP block_set_io_throttle)",
    net_rate_limit=None,
    net_packet_limit=None,
    user_networking=True,
)
#: one throttle group for every drive makes a disk limit per VM, not per drive
THROTTLE_GROUP = "stoker-vm"


class QemuDriver:
    """Makes ``QemuVMM`` handles; holds the host facts every launch needs."""

    name = "qemu"
    capabilities = CAPABILITIES

    def __init__(
        self,
        settings: LaunchSettings,
        kvm_probe: Callable[[], kvm.KvmProbe] = kvm.cached_probe,
        tsc_khz: int | None = None,
    ) -> None:
        self.settings = settings
        self.binary = settings.binary
        self.kvm_probe = kvm_probe
        self.tsc_khz = tsc_khz if tsc_khz is not None else host_tsc_khz()

    def check(self, spec: VMSpec) -> None:
        """The binary, KVM when asked for, and every image the spec names (in a pool, not a
        link, not an agent's or another VM's file): ImageRejected names the field."""
        if shutil.which(self.binary) is None:
            raise DriverUnavailable(
                f"QEMU binary {self.binary!r} not found: install qemu-system-x86 "
                "(apt-get install qemu-system-x86) or set [qemu] binary in the config"
            )
        if spec.accel == Accel.KVM:
            probe = self.kvm_probe()
            if not probe.usable:
                raise DriverUnavailable(
                    f"accel 'kvm' was asked for but KVM cannot run guests here: {probe.reason};"
                    " use accel 'tcg' or 'auto'"
                )
        check_images(self.settings, spec)

    def choose_accel(self, spec: VMSpec) -> str:
        accel, warning = kvm.choose_accel(spec.accel.value, self.kvm_probe)
        if warning:
            log.warning(warning, extra={"vm": spec.name})
        return accel

    def cmdline(self, spec: VMSpec, accel: str) -> str:
        """Under TCG a microvm guest has no fallback clock, and about 3% of boots hang
        calibrating the TSC; giving the kernel the host's TSC frequency removes the hang."""
        if accel == "tcg" and self.tsc_khz and "tsc_early_khz=" not in spec.cmdline:
            return f"{spec.cmdline} tsc_early_khz={self.tsc_khz}"
        return spec.cmdline

    def prepare(
        self,
        vm_id: str,
        spec: VMSpec,
        paths: VMPaths,
        boot: BootOptions,
        incoming: Path | None = None,
    ) -> PreparedLaunch:
        """The command line and its opened descriptors (also what a benchmark's plain QEMU
        runs, so both start the same argv)."""
        accel = self.choose_accel(spec)
        return prepare(
            self.settings,
            vm_id=vm_id,
            spec=spec,
            paths=paths,
            boot=boot,
            accel=accel,
            cmdline=self.cmdline(spec, accel),
            incoming=incoming,
        )

    async def spawn(
        self,
        vm_id: str,
        spec: VMSpec,
        paths: VMPaths,
        boot: BootOptions,
        launched: Launched | None = None,
    ) -> QemuVMM:
        """QEMU takes its limits live once up (``apply_io_limits``), not from ``boot``."""
        vmm = await self._launch(vm_id, spec, paths, boot)
        if launched is not None:
            await _or_end(vmm, launched(vmm))
        return vmm

    async def restore(
        self,
        vm_id: str,
        spec: VMSpec,
        paths: VMPaths,
        state: Path,
        boot: BootOptions,
        launched: Launched | None = None,
    ) -> QemuVMM:
        """Start QEMU reading migration data from ``state`` (a descriptor), then run it."""
        vmm = await self._launch(vm_id, spec, paths, boot, incoming=state)
        try:
            if launched is not None:
                await launched(vmm)
            await vmm.finish_incoming(boot.restore_timeout_s, resume=boot.resume_restored)
        except BaseException:
            # never leave a half-restored QEMU behind: nobody else knows its pid yet
            await vmm.kill()
            await vmm.close()
            raise
        return vmm

    async def _launch(
        self,
        vm_id: str,
        spec: VMSpec,
        paths: VMPaths,
        boot: BootOptions,
        incoming: Path | None = None,
    ) -> QemuVMM:
        prepared = await asyncio.to_thread(self.prepare, vm_id, spec, paths, boot, incoming)
        argv = prepared.command.argv
        try:
            child = spawn_detached(
                argv,
                paths.vmm_log,
                cwd=paths.root,
                env=minimal_env(),
                pass_fds=prepared.command.pass_fds,
            )
        except OSError as exc:
            raise DriverUnavailable(f"cannot start {argv[0]}: {exc}") from exc
        finally:
            prepared.close()
        start_time = read_start_time(child.pid) or 0
        accel = argv[argv.index("-accel") + 1]
        record = ProcessRecord(
            pid=child.pid,
            start_time=start_time,
            control_socket=str(paths.control_socket),
            accel=accel,
            argv=tuple(argv),
        )
        return QemuVMM(spec, paths, record, child=child)

    @functools.cached_property
    def version(self) -> str:
        """QEMU's own version line: saved state is only valid for the QEMU that wrote it."""
        try:
            done = subprocess.run(
                [self.binary, "--version"], capture_output=True, text=True, timeout=10,
                env=minimal_env(), check=False,
            )  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return "unknown"
        return done.stdout.splitlines()[0].strip() if done.stdout else "unknown"

    def orphan(self, vm_id: str, paths: VMPaths) -> ProcessRecord | None:
        """A VMM of this VM started just before the agent died, before its pid was written
        down: found by the tag in its command line."""
        for pid in find_processes_with_arg(f"process={process_tag(vm_id)}"):
            start = read_start_time(pid)
            if start is not None:
                return ProcessRecord(pid, start, str(paths.control_socket))
        return None

    async def adopt(self, spec: VMSpec, paths: VMPaths, record: ProcessRecord) -> QemuVMM:
        if not is_same_live_process(record.pid, record.start_time):
            raise DriverError(f"process {record.pid} is gone or is another process now")
        if not Path(record.control_socket).exists():
            raise DriverError(f"QMP socket {record.control_socket} is missing")
        vmm = QemuVMM(spec, paths, record, child=None)
        await vmm.connect(timeout_s=2.0)
        return vmm


class QemuVMM:
    """One QEMU process and our QMP connection to it."""

    def __init__(
        self,
        spec: VMSpec,
        paths: VMPaths,
        record: ProcessRecord,
        child: subprocess.Popen[bytes] | None = None,
    ) -> None:
        self.spec = spec
        self.paths = paths
        self.record = record
        self.child = child
        self.qmp: QMPClient | None = None
        self.shutdown_reason: str | None = None  # from the QMP SHUTDOWN event
        self._events_task: asyncio.Task[None] | None = None
        self._connect_lock = asyncio.Lock()
        self._watch: ExitWatch | None = None

    def exit_signal(self) -> ExitWatch:
        if self._watch is None:
            self._watch = ExitWatch(self.record.pid, self.child)
        return self._watch

    def powered_off_by_guest(self) -> bool:
        """True once QEMU has said the guest itself asked to power off (its SHUTDOWN event
        says ``guest-shutdown``; a crash or a kill says otherwise or nothing)."""
        return self.shutdown_reason == "guest-shutdown"

    async def connect(self, timeout_s: float) -> QMPClient:
        """Connect QMP, retrying while QEMU creates its socket."""
        async with self._connect_lock:
            if self.qmp is not None:
                return self.qmp
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            last_error: Exception | None = None
            while loop.time() < deadline:
                client = QMPClient(f"stoker-{self.spec.name}")
                try:
                    await asyncio.wait_for(
                        client.connect(self.record.control_socket),
                        max(0.05, deadline - loop.time()),
                    )
                except (ConnectError, OSError, TimeoutError, QMPError) as exc:
                    last_error = exc
                    await asyncio.sleep(QMP_CONNECT_POLL_S)
                    continue
                self.qmp = client
                self._events_task = asyncio.create_task(self._watch_events(client))
                return client
            raise BootFailed(f"QMP did not answer within {timeout_s:g} s: {last_error}")

    async def _watch_events(self, client: QMPClient) -> None:
        with contextlib.suppress(asyncio.CancelledError, QMPError):
            async for event in client.events:
                if event["event"] == "SHUTDOWN":
                    data = event.get("data")
                    self.shutdown_reason = data.get("reason") if isinstance(data, dict) else None

    async def execute(
        self, cmd: str, args: dict[str, Any] | None = None, timeout_s: float = 5.0
    ) -> Any:
        client = await self.connect(timeout_s)
        try:
            return await asyncio.wait_for(client.execute(cmd, args), timeout_s)
        except ExecuteError as exc:
            raise DriverError(f"QMP {cmd} failed: {exc}") from exc
        except TimeoutError as exc:
            raise DriverError(f"QMP {cmd} did not answer within {timeout_s:g} s") from exc
        except QMPError as exc:
            raise DriverError(f"QMP {cmd} failed: {exc}") from exc

    async def wait_ready(self, timeout_s: float) -> None:
        """Ready is the marker line on the console when the spec names one, else QMP answering."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        await self.connect(timeout_s)
        marker = self.spec.ready_marker
        if marker is None:
            await self.status(max(0.1, deadline - loop.time()))
            return
        needle = marker.encode()
        offset, tail = 0, b""
        while True:
            try:
                with open(self.paths.console, "rb") as console:
                    console.seek(offset)
                    chunk = console.read()
            except FileNotFoundError:
                chunk = b""
            if chunk:
                offset += len(chunk)
                window = tail + chunk
                if needle in window:
                    return
                tail = window[-len(needle) :]
            if loop.time() >= deadline:
                raise BootFailed(
                    f"boot timeout: the guest did not print its ready marker {marker!r} "
                    f"within {timeout_s:g} s"
                )
            await asyncio.sleep(CONSOLE_POLL_S)

    async def status(self, timeout_s: float = 1.0) -> VMMStatus:
        answer = await self.execute("query-status", timeout_s=timeout_s)
        return VMMStatus(running=bool(answer.get("running")), status=str(answer.get("status")))

    async def request_shutdown(self) -> None:
        await self.execute("system_powerdown")

    async def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.record.pid, signal.SIGKILL)

    async def pause(self) -> None:
        await self.execute("stop")

    async def resume(self) -> None:
        await self.execute("cont")

    async def stats(self) -> VMMStats:
        answer = await self.execute("query-blockstats")
        disks = tuple(
            DiskStats(
                device=str(entry.get("qdev") or entry.get("device") or entry.get("node-name")),
                read_bytes=int(entry["stats"].get("rd_bytes", 0)),
                write_bytes=int(entry["stats"].get("wr_bytes", 0)),
                read_ops=int(entry["stats"].get("rd_operations", 0)),
                write_ops=int(entry["stats"].get("wr_operations", 0)),
            )
            for entry in answer
        )
        return VMMStats(disks=disks)

    async def apply_io_limits(self, limits: IOLimits) -> None:
        """Disk limits through one throttle group, then read back from ``query-block``: the
        originals trusted a command that had failed."""
        if limits.net_mbps or limits.net_pps:
            raise Unsupported(
                "QEMU does not rate-limit its network device itself",
                "the host shapes the VM's TAP device instead",
            )
        iops = limits.disk_iops or 0
        bps = limits.disk_bytes_per_s or 0
        # On microvm the virtio-blk-device sits on the virtio-mmio bus with no virtio-backend
        # child: its qdev id ("vd0", as query-block shows) is the name QMP accepts.
        for index, _drive in enumerate(self.spec.drives):
            await self.execute(
                "block_set_io_throttle",
                {
                    "id": f"vd{index}",
                    "bps": bps, "bps_rd": 0, "bps_wr": 0,
                    "iops": iops, "iops_rd": 0, "iops_wr": 0,
                    "group": THROTTLE_GROUP,
                },
            )  # fmt: skip
        for drive in await self.io_limits_in_force():
            if (drive.iops, drive.bytes_per_s) != (iops, bps):
                raise DriverError(
                    f"QEMU reports iops={drive.iops} bps={drive.bytes_per_s} on drive "
                    f"{drive.device} after setting iops={iops} bps={bps}"
                )

    async def io_limits_in_force(self) -> tuple[DriveThrottle, ...]:
        blocks = await self.execute("query-block")
        return tuple(
            DriveThrottle(
                device=str(entry.get("qdev") or entry.get("device")),
                iops=int((entry.get("inserted") or {}).get("iops", 0)),
                bytes_per_s=int((entry.get("inserted") or {}).get("bps", 0)),
                group=(entry.get("inserted") or {}).get("group"),
            )
            for entry in blocks
        )

    async def save_state(self, dest: Path) -> None:
        """Save RAM and device state to ``dest`` (7.2 rejects ``file:`` migration URIs).

        The file is opened here and handed to QEMU over QMP (``getfd`` + ``fd:``), so QEMU
        writes it itself: with ``exec:cat > FILE`` QEMU closes the pipe and SIGTERMs a
        ``cat`` that may not have written the last bytes yet, and "completed" does not
        mean the file is complete. With the fd, completed means every byte is in the file.
        """
        await self.execute("migrate-set-parameters", {"max-bandwidth": 64 * 1024 * 1024 * 1024})
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            client = await self.connect(5.0)
            client.send_fd_scm(fd)
            await self.execute("getfd", {"fdname": "stoker-state"})
        finally:
            os.close(fd)
        await self.execute("migrate", {"uri": "fd:stoker-state"})
        while True:
            info = await self.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise DriverError(f"saving memory state failed: {info.get('error-desc', status)}")
            await asyncio.sleep(0.01)

    async def sync_guest_clock(self, now: datetime, timeout_s: float) -> None:
        """``guest-set-time`` over the guest agent channel, as libvirt does after a restore.
        The answer is read (one line) but a guest that takes a moment to step its clock does
        not hold the caller up longer than ``timeout_s``."""
        command = {"execute": "guest-set-time", "arguments": {"time": _ns(now)}}
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_unix_connection(str(self.paths.agent_socket))
                try:
                    writer.write(json.dumps(command).encode() + b"\n")
                    await writer.drain()
                    answer = json.loads(await reader.readline() or b"{}")
                finally:
                    writer.close()
        except (TimeoutError, OSError, ValueError) as exc:
            raise DriverError(f"the guest agent did not answer guest-set-time: {exc!r}") from exc
        if "return" not in answer:
            raise DriverError(f"the guest agent refused guest-set-time: {answer}")

    async def cancel_state_save(self) -> bool:
        """A migration an interrupted snapshot left running is cancelled, and waited for."""
        info = await self.execute("query-migrate")
        if info.get("status") not in ("setup", "active", "pre-switchover", "device"):
            return False
        await self.execute("migrate_cancel")
        for _ in range(100):
            info = await self.execute("query-migrate")
            if info.get("status") not in ("active", "cancelling"):
                break
            await asyncio.sleep(0.05)
        return True

    async def finish_incoming(self, timeout_s: float = 60.0, resume: bool = True) -> None:
        """After ``-incoming``: wait until QEMU has loaded the state, then run it (unless
        ``resume`` is False: the caller resumes it)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            status = await self.status(timeout_s=max(0.1, deadline - loop.time()))
            if (
                status.status in ("paused", "postmigrate", "prelaunch")
                and status.status != "inmigrate"
            ):
                break
            if status.running:
                return
            if loop.time() >= deadline:
                raise BootFailed(f"restoring state did not finish within {timeout_s:g} s")
            await asyncio.sleep(0.002)
        if resume:
            await self.resume()

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self._events_task is not None:
            self._events_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._events_task
            self._events_task = None
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.disconnect(), 1.0)
            self.qmp = None


def _ns(at: datetime) -> int:
    return int(at.timestamp() * 1_000_000_000)


async def _or_end(vmm: QemuVMM, step: Awaitable[None]) -> None:
    """Run ``step``; if it fails, end the VMM (nobody else knows its pid yet) and re-raise."""
    try:
        await step
    except BaseException:
        await vmm.kill()
        await vmm.close()
        raise
