"""The Firecracker driver: spawn, configure, boot, stop, snapshot and restore a microVM.

Firecracker is configured entirely through its API after the process starts, so ``spawn``
starts the process, waits for its socket and sends the configuration in the order the spec
gives (machine, CPU, boot source, drives, network, devices, logger, metrics) before the one
``InstanceStart``. A process that dies on the way is reported with what its exit code means.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from stoker.domain.spec import DriveFormat, NetworkMode, VMSpec
from stoker.domain.units import MiB, disk_rate_limiter, rate_limiter
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
from stoker.drivers.firecracker import jailer as jl
from stoker.drivers.firecracker.api import (
    FirecrackerAPI,
    FirecrackerAPIError,
    LogLevel,
    SnapshotType,
)
from stoker.drivers.firecracker.exitcodes import exit_reason
from stoker.host.confine import minimal_env
from stoker.host.images import ImagePolicy, check_image
from stoker.host.proc import (
    ExitStatus,
    ExitWatch,
    find_processes_with_arg,
    is_same_live_process,
    read_start_time,
    spawn_detached,
)
from stoker.host.proc import kill as kill_pid

BINARY_ENV = "STOKER_FIRECRACKER_BIN"
MISSING_BINARY = "firecracker binary not found: set STOKER_FIRECRACKER_BIN or install Firecracker"
IFACE_ID = "eth0"
SNAPSHOT_STATE = "vmstate"
SNAPSHOT_MEMORY = "memory"
#: the metrics file (one JSON object per line), beside the VMM log in the VM directory
METRICS_FILE = "metrics.jsonl"
#: sun_path holds 108 bytes including the terminating NUL
UNIX_PATH_MAX = 107
#: a bucket with size 0 disables that limit; sent on PATCH, where a missing bucket means
#: "leave as it is", so that removing a limit really removes it
DISABLED_BUCKET: dict[str, int] = {"size": 0, "refill_time": 0}


@dataclass(frozen=True)
class JailerConfig:
    """Run Firecracker through the jailer: chroot, unprivileged uid/gid, cgroup, netns.

    ``uid``/``gid`` None (the default): each VM runs as its own ids (``BootOptions.identity``,
    from ``[security] vm_uid_range``), as a confined QEMU does."""

    uid: int | None = None
    gid: int | None = None
    binary: str = "jailer"
    chroot_base: Path = jl.DEFAULT_CHROOT_BASE
    cgroup_version: int | None = None  # None: 2 if /sys/fs/cgroup is cgroup2, else 1
    cpu_percent: int | None = None  # hard CPU cap, 100 = one core
    #: memory cap = guest RAM + this; None means no memory cap (guest RAM alone kills the VMM)
    memory_overhead_mib: int | None = None
    cgroups: dict[str, str] = field(default_factory=dict)
    parent_cgroup: str | None = None
    netns: str | None = None
    daemonize: bool = False
    new_pid_ns: bool = False

    def version(self) -> int:
        if self.cgroup_version is not None:
            return self.cgroup_version
        return 2 if Path("/sys/fs/cgroup/cgroup.controllers").exists() else 1


@dataclass(frozen=True)
class FirecrackerOptions:
    """How this host runs Firecracker; one per agent, shared by every Firecracker VM."""

    binary: str | None = None  # None: $STOKER_FIRECRACKER_BIN, else `firecracker` on PATH
    jailer: JailerConfig | None = None
    #: where kernels, initrds and disks may come from; None accepts any path (tests only)
    images: ImagePolicy | None = None
    kvm_device: Path = Path("/dev/kvm")
    #: also run a guest instruction (stoker.host.kvm): /dev/kvm can exist where guests hang
    probe_kvm: bool = True
    arch: str = field(default_factory=platform.machine)
    api_timeout_s: float = 5.0
    socket_timeout_s: float = 3.0
    log_level: LogLevel = "Warning"
    track_dirty_pages: bool = False  # needed for Diff snapshots
    balloon_mib: int | None = None
    vsock_cid: Callable[[str], int] | None = None  # vm id -> guest CID (>= 3), unique per host
    entropy: bool = False


def resolve_binary(configured: str | None) -> str | None:
    """The Firecracker executable to run, or None if there is none."""
    candidate = configured or os.environ.get(BINARY_ENV) or "firecracker"
    if "/" in candidate:
        return candidate if os.access(candidate, os.X_OK) and Path(candidate).is_file() else None
    return shutil.which(candidate)


def boot_args(cmdline: str, arch: str) -> str:
    """The guest command line, fixed so that a graceful stop can work on x86_64.

    ``SendCtrlAltDel`` reaches the guest through the i8042 keyboard controller, and only
    ``reboot=k`` makes the guest's reboot end the Firecracker process; ``panic=1`` turns a
    guest panic into an exit instead of a hung VM.
    """
    words = cmdline.split()
    if arch == "x86_64":
        words = [w for w in words if w != "i8042.nokbd"]
        if not any(w.startswith("reboot=") for w in words):
            words.append("reboot=k")
    if not any(w.startswith("panic=") for w in words):
        words.append("panic=1")
    return " ".join(words)


def drive_layout(spec: VMSpec) -> list[tuple[str, int, bool]]:
    """(drive_id, index in spec.drives, is_root) for every drive.

    The first drive is the root device unless the guest boots from an initramfs; ids are
    stable so that live limit changes (PATCH /drives/{id}) find the same drive later.
    """
    layout = []
    for i, _ in enumerate(spec.drives):
        is_root = i == 0 and spec.initrd is None
        layout.append(("rootfs" if is_root else f"data{i}", i, is_root))
    return layout


def _nz(value: float | None) -> Any:
    """IOLimits uses 0 or None for "no limit"; the bucket maths wants None."""
    return value if value else None


def full_limiter(limiter: dict[str, Any] | None) -> dict[str, Any]:
    """A RateLimiter with both buckets, the missing one disabled: what a live PATCH needs."""
    limiter = limiter or {}
    return {
        "bandwidth": limiter.get("bandwidth", DISABLED_BUCKET),
        "ops": limiter.get("ops", DISABLED_BUCKET),
    }


# ---------------------------------------------------------------------------- metrics


class MetricsAccumulator:
    """Totals from Firecracker's metrics file, whose counters are deltas since the last flush.

    Each line is one JSON object; per-device sections are ``block_<drive id>`` and
    ``net_<iface id>``, beside the aggregates ``block`` and ``net``. Only whole lines are
    read, so a flush caught half-written is picked up on the next read.
    """

    def __init__(self) -> None:
        self.disks: dict[str, dict[str, int]] = {}
        self.net_rx_bytes = 0
        self.net_tx_bytes = 0
        self.offset = 0
        self.lines = 0

    def feed_line(self, line: str) -> None:
        line = line.strip()
        if not line:
            return
        try:
            obj = json.loads(line)
        except ValueError:
            return
        if not isinstance(obj, dict):
            return
        self.lines += 1
        devices = {
            k[6:]: v for k, v in obj.items() if k.startswith("block_") and isinstance(v, dict)
        }
        if not devices and isinstance(obj.get("block"), dict):
            devices = {"block": obj["block"]}
        for dev, section in devices.items():
            totals = self.disks.setdefault(
                dev, {"read_bytes": 0, "write_bytes": 0, "read_count": 0, "write_count": 0}
            )
            for key in totals:
                totals[key] += _int(section.get(key))
        nets = (
            [obj["net"]]
            if isinstance(obj.get("net"), dict)
            else [v for k, v in obj.items() if k.startswith("net_") and isinstance(v, dict)]
        )
        for section in nets:
            self.net_rx_bytes += _int(section.get("rx_bytes_count"))
            self.net_tx_bytes += _int(section.get("tx_bytes_count"))

    def read_new(self, path: Path) -> None:
        """Feed the complete lines written since the last read."""
        try:
            with open(path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n")
        if end < 0:
            return
        for raw in data[: end + 1].splitlines():
            self.feed_line(raw.decode(errors="replace"))
        self.offset += end + 1

    def stats(self, has_network: bool = True) -> VMMStats:
        disks = tuple(
            DiskStats(
                device=dev,
                read_bytes=t["read_bytes"],
                write_bytes=t["write_bytes"],
                read_ops=t["read_count"],
                write_ops=t["write_count"],
            )
            for dev, t in sorted(self.disks.items())
        )
        if not has_network:
            return VMMStats(disks=disks)
        return VMMStats(disks=disks, net_rx_bytes=self.net_rx_bytes, net_tx_bytes=self.net_tx_bytes)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


# ---------------------------------------------------------------------------- the VMM handle


class FirecrackerVMM:
    """A live handle to one Firecracker process and its API socket."""

    def __init__(
        self,
        record: ProcessRecord,
        child: subprocess.Popen[bytes] | None,
        spec: VMSpec,
        paths: VMPaths,
        config: FirecrackerOptions,
    ) -> None:
        self.record = record
        self.child = child
        self.spec = spec
        self.paths = paths
        self.config = config
        self.api = FirecrackerAPI(record.control_socket, timeout_s=config.api_timeout_s)
        self.watch = ExitWatch(record.pid, child)
        self.metrics = MetricsAccumulator()
        self._console_offset = int(record.facts.get("console_offset", 0))

    # ---- facts about this VM

    @property
    def exited(self) -> asyncio.Future[ExitStatus]:
        return self.watch.exited

    def exit_signal(self) -> ExitWatch:
        return self.watch

    def powered_off_by_guest(self) -> bool:
        """Firecracker exits with code 0 only when the guest itself resets or powers off
        (``reboot=k``); a kill or a crash leaves a signal or another code."""
        if not self.exited.done() or self.exited.cancelled():
            return False
        return self.exited.result().code == 0

    def exit_reason(self) -> str | None:
        """What the exit code means, once the process has exited."""
        if not self.exited.done() or self.exited.cancelled():
            return None
        status = self.exited.result()
        return exit_reason(status.code, status.signal)

    @property
    def metrics_path(self) -> Path:
        return Path(self.record.facts.get("metrics_path", self.paths.root / METRICS_FILE))

    @property
    def log_path(self) -> Path:
        return Path(self.record.facts.get("log_path", self.paths.vmm_log))

    @property
    def jail_root(self) -> Path | None:
        root = self.record.facts.get("jail_root")
        return Path(root) if root else None

    def _in_vmm(self, host_path: Path) -> str:
        """How Firecracker names a host path: relative to the chroot when jailed."""
        root = self.jail_root
        if root is None:
            return str(host_path)
        return "/" + str(host_path.relative_to(root))

    def console_tail(self, lines: int = 5) -> str:
        try:
            data = self.paths.console.read_bytes()[self._console_offset :]
        except FileNotFoundError:
            return ""
        return "\n".join(data.decode(errors="replace").splitlines()[-lines:])

    def boot_failure(self, what: str) -> BootFailed:
        """BootFailed for a process that exited: what its exit code means and its last output."""
        tail = self.console_tail()
        reason = self.exit_reason() or "Firecracker exited"
        return BootFailed(f"{what}: {reason}" + (f"; last output:\n{tail}" if tail else ""))

    # ---- Protocol

    async def wait_ready(self, timeout_s: float) -> None:
        """Ready is the spec's console marker, else the API saying "Running".

        A restored guest booted long ago and never prints its marker again, so it is
        ready when the API says "Running".
        """
        deadline = time.monotonic() + timeout_s
        marker = self.spec.ready_marker
        use_marker = marker is not None and not self.record.facts.get("restored")
        offset = self._console_offset
        carry = b""
        while True:
            if self.exited.done():
                raise self.boot_failure("Firecracker exited before the guest was ready")
            if use_marker and marker is not None:
                with contextlib.suppress(FileNotFoundError), open(self.paths.console, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                    offset += len(chunk)
                    window = carry + chunk
                    if marker.encode() in window:
                        return
                    carry = window[-max(len(marker) - 1, 0) :] if len(marker) > 1 else b""
            else:
                with contextlib.suppress(httpx.HTTPError, FirecrackerAPIError):
                    info = await self.api.describe_instance(timeout_s=0.5)
                    if info.get("state") == "Running":
                        return
            if time.monotonic() >= deadline:
                what = f"console line {marker!r}" if use_marker else "state Running"
                raise BootFailed(f"guest not ready after {timeout_s:g} s (waiting for {what})")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.exited), 0.05)

    async def status(self, timeout_s: float) -> VMMStatus:
        try:
            info = await self.api.describe_instance(timeout_s=timeout_s)
        except (httpx.HTTPError, OSError) as exc:
            raise DriverError(
                f"Firecracker API did not answer in {timeout_s:g} s: {exc!r}"
            ) from exc
        state = str(info.get("state", "unknown"))
        return VMMStatus(running=state == "Running", status=state)

    async def request_shutdown(self) -> None:
        """Ctrl-Alt-Del on x86_64; elsewhere Firecracker has no graceful stop at all."""
        if self.config.arch != "x86_64":
            raise Unsupported(
                f"Firecracker has no graceful shutdown on {self.config.arch} "
                "(SendCtrlAltDel is x86_64 only): the lifecycle must stop it with kill"
            )
        await self.api.send_ctrl_alt_del()

    async def kill(self) -> None:
        """SIGKILL, only if the pid is still the process we started (pids are reused)."""
        if is_same_live_process(self.record.pid, self.record.start_time):
            kill_pid(self.record.pid, signal.SIGKILL)

    async def pause(self) -> None:
        await self.api.pause()

    async def resume(self) -> None:
        await self.api.resume()

    async def stats(self) -> VMMStats:
        """Flush Firecracker's metrics, then add the new deltas to the running totals."""
        await self.api.flush_metrics()
        self.metrics.read_new(self.metrics_path)
        return self.metrics.stats(has_network=_has_nic(self.spec))

    async def apply_io_limits(self, limits: IOLimits) -> None:
        """PATCH every drive and the interface; unset figures remove earlier limits."""
        disk = full_limiter(disk_rate_limiter(_nz(limits.disk_bytes_per_s), _nz(limits.disk_iops)))
        for drive_id, _, _ in drive_layout(self.spec):
            await self.api.patch_drive(drive_id, rate_limiter=disk)
        want = (_per_second(disk, "ops"), _per_second(disk, "bandwidth"))
        for drive in await self.io_limits_in_force() if self.spec.drives else ():
            if (drive.iops, drive.bytes_per_s) != want:
                raise DriverError(
                    f"Firecracker reports iops={drive.iops} bytes/s={drive.bytes_per_s} on "
                    f"drive {drive.device} after setting iops={want[0]} bytes/s={want[1]}"
                )
        if _has_nic(self.spec):
            net = full_limiter(rate_limiter(_nz(limits.net_mbps), _nz(limits.net_pps)))
            await self.api.patch_network_interface(
                IFACE_ID, rx_rate_limiter=net, tx_rate_limiter=net
            )

    async def io_limits_in_force(self) -> tuple[DriveThrottle, ...]:
        """The drives' rate limiters as ``GET /vm/config`` reports them, per second."""
        config = await self.api.get_vm_config()
        return tuple(
            DriveThrottle(
                device=str(drive.get("drive_id")),
                iops=_per_second(drive.get("rate_limiter"), "ops"),
                bytes_per_s=_per_second(drive.get("rate_limiter"), "bandwidth"),
            )
            for drive in config.get("drives", [])
        )

    async def sync_guest_clock(self, now: datetime, timeout_s: float) -> None:
        """Firecracker has no guest agent channel. On x86_64 its snapshot load already
        advanced the guest's kvmclock to now (``clock_realtime``); a guest learns that it was
        restored from its VM generation ID (where the guest kernel supports it) and runs its
        own resume work from there. Elsewhere: nothing stoker can do from the host."""
        if self.config.arch == "x86_64" and self.record.facts.get("restored"):
            return
        raise Unsupported(
            "Firecracker has no guest agent to tell a restored guest the time",
            "run time synchronisation in the guest (it sees its VM generation ID change)",
        )

    async def cancel_state_save(self) -> bool:
        """``PUT /snapshot/create`` finishes inside Firecracker even when its caller died:
        there is never a save left running to cancel."""
        return False

    async def save_state(self, dest: Path, snapshot_type: SnapshotType = "Full") -> None:
        """Write ``dest/vmstate`` and ``dest/memory`` of a paused VM; disks are not included."""
        if snapshot_type == "Diff" and not self.config.track_dirty_pages:
            raise Unsupported("Diff snapshots need track_dirty_pages in the Firecracker config")
        state = (await self.status(self.config.api_timeout_s)).status
        if state != "Paused":
            raise DriverError(
                f"Firecracker snapshots need a paused VM (it is {state}): pause first"
            )
        dest.mkdir(parents=True, exist_ok=True)
        root = self.jail_root
        where = dest if root is None else root / "snapshot"
        where.mkdir(parents=True, exist_ok=True)
        await self.api.snapshot_create(
            self._in_vmm(where / SNAPSHOT_STATE),
            self._in_vmm(where / SNAPSHOT_MEMORY),
            snapshot_type,
        )
        if root is not None:
            for name in (SNAPSHOT_STATE, SNAPSHOT_MEMORY):
                shutil.move(where / name, dest / name)

    async def close(self) -> None:
        """Drop the connection; once the process has exited, also its jail (bind mounts
        first), so nothing of it stays mounted on the host."""
        exited = self.exited.done() and not self.exited.cancelled()
        self.watch.cancel()
        await self.api.aclose()
        root = self.jail_root
        if exited and root is not None:
            with contextlib.suppress(OSError, ValueError):
                await asyncio.to_thread(jl.clean_jail, jl.JailPaths(base=root.parent, root=root))


# ---------------------------------------------------------------------------- the driver


CAPABILITIES = Capabilities(
    graceful_stop=True,  # SendCtrlAltDel on x86_64; elsewhere request_shutdown refuses
    pause=True,
    memory_snapshot=True,
    disk_throttle="Firecracker drive rate limiter",
    net_rate_limit="Firecracker network-interface rate limiter (rx and tx)",
    net_packet_limit="Firecracker network-interface rate limiter (rx and tx)",
    user_networking=False,
)


class FirecrackerDriver:
    """Makes Firecracker VMM handles; see FirecrackerOptions for what it can be told."""

    name = "firecracker"
    capabilities = CAPABILITIES

    def __init__(self, config: FirecrackerOptions | None = None) -> None:
        self.config = config or FirecrackerOptions()

    # ---- check

    def check(self, spec: VMSpec) -> None:
        cfg = self.config
        if resolve_binary(cfg.binary) is None:
            tried = cfg.binary or os.environ.get(BINARY_ENV)
            raise DriverUnavailable(MISSING_BINARY + (f" (tried {tried})" if tried else ""))
        if cfg.jailer is not None and resolve_binary(cfg.jailer.binary) is None:
            raise DriverUnavailable(f"jailer binary not found: {cfg.jailer.binary}")
        if not cfg.kvm_device.exists():
            raise DriverUnavailable(f"Firecracker needs KVM and {cfg.kvm_device} is missing")
        if cfg.probe_kvm:
            from stoker.host.kvm import cached_probe

            probe = cached_probe()
            if not probe.usable:
                raise DriverUnavailable(f"KVM cannot run guests here: {probe.reason}")
        if cfg.images is not None:
            for name, path in image_paths(spec):
                check_image(cfg.images, name, path)
        if spec.accel == "tcg":
            raise Unsupported("Firecracker runs on KVM only: accel 'tcg' needs the qemu driver")
        if spec.network.mode == NetworkMode.USER:
            raise Unsupported(
                "Firecracker has no user-mode networking"
                + (" and so no port forwards" if spec.network.port_forwards else "")
                + ": use network mode 'tap' (or the qemu driver)"
            )
        for i, drive in enumerate(spec.drives):
            if drive.format != DriveFormat.RAW:
                raise Unsupported(
                    f"drive {i} ({drive.path}) is {drive.format}: Firecracker reads raw images only"
                )
        if spec.vcpus > 32:
            raise Unsupported(f"Firecracker allows 1 to 32 vCPUs, not {spec.vcpus}")
        if cfg.arch == "x86_64":
            with contextlib.suppress(OSError), open(spec.kernel, "rb") as f:
                if f.read(4) != b"\x7fELF":
                    raise Unsupported(
                        f"{spec.kernel} is not an ELF vmlinux: Firecracker on x86_64 boots an "
                        "uncompressed vmlinux, not a bzImage/vmlinuz"
                    )
        if cfg.jailer is not None and cfg.jailer.daemonize and spec.ready_marker:
            raise Unsupported(
                "the jailer's --daemonize sends the console to /dev/null, so ready_marker "
                "cannot be seen: drop daemonize or the marker"
            )

    # ---- spawn / restore / adopt

    async def spawn(
        self,
        vm_id: str,
        spec: VMSpec,
        paths: VMPaths,
        boot: BootOptions,
        launched: Launched | None = None,
    ) -> FirecrackerVMM:
        """Start Firecracker, configure the VM through the API, and boot it (InstanceStart).

        Any refusal or early exit kills the process and raises BootFailed with Firecracker's
        own message (the FirecrackerAPIError is the cause).
        """
        self.check(spec)
        vmm, files = await self._launch(vm_id, spec, paths, boot, restored=False)
        try:
            if launched is not None:
                await launched(vmm)  # before InstanceStart: the guest has touched nothing
            await self._configure(vmm, vm_id, spec, files, boot)
        except BaseException as exc:
            await self._abort(vmm)
            if isinstance(exc, FirecrackerAPIError):
                raise BootFailed(f"Firecracker refused the configuration: {exc}") from exc
            if isinstance(exc, (httpx.HTTPError, OSError)) and vmm.exited.done():
                raise vmm.boot_failure("Firecracker exited during configuration") from exc
            raise
        return vmm

    async def restore(
        self,
        vm_id: str,
        spec: VMSpec,
        paths: VMPaths,
        state: Path,
        boot: BootOptions,
        launched: Launched | None = None,
    ) -> FirecrackerVMM:
        """A fresh process, logger and metrics, then snapshot load (resumed).

        The disks must be where they were when the snapshot was taken; a TAP device may be
        renamed (network_overrides). A failed load ends Firecracker: reported as BootFailed.
        """
        self.check(spec)
        for name in (SNAPSHOT_STATE, SNAPSHOT_MEMORY):
            if not (state / name).is_file():
                raise DriverError(f"no snapshot at {state}: {state / name} is missing")
        vmm, _ = await self._launch(vm_id, spec, paths, boot, restored=True)
        try:
            if launched is not None:
                await launched(vmm)
            snap = self._link_snapshot(vmm, state)
            await self._logging(vmm)
            overrides = None
            nic = _nic(spec, boot)
            if nic is not None:
                overrides = [{"iface_id": IFACE_ID, "host_dev_name": nic[0]}]
            await vmm.api.snapshot_load(
                snap[SNAPSHOT_STATE],
                snap[SNAPSHOT_MEMORY],
                resume_vm=boot.resume_restored,
                track_dirty_pages=self.config.track_dirty_pages,
                network_overrides=overrides,
                # the spec: x86_64 only; advances kvmclock to the host's time
                clock_realtime=self.config.arch == "x86_64",
            )
        except BaseException as exc:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(vmm.exited), 1.0)
            await self._abort(vmm)
            fault = exc.fault_message if isinstance(exc, FirecrackerAPIError) else repr(exc)
            if isinstance(exc, Exception):
                raise BootFailed(
                    f"snapshot load from {state} failed: {fault}; "
                    f"{vmm.exit_reason() or 'Firecracker was killed'}"
                ) from exc
            raise
        return vmm

    def orphan(self, vm_id: str, paths: VMPaths) -> ProcessRecord | None:
        """A Firecracker of this VM started just before the agent died: its ``--id``."""
        for pid in find_processes_with_arg(vm_id):
            start = read_start_time(pid)
            if start is not None:
                return ProcessRecord(pid, start, str(paths.control_socket))
        return None

    async def adopt(self, spec: VMSpec, paths: VMPaths, record: ProcessRecord) -> FirecrackerVMM:
        if not is_same_live_process(record.pid, record.start_time):
            raise DriverError(
                f"pid {record.pid} is no longer the Firecracker started at tick {record.start_time}"
            )
        vmm = FirecrackerVMM(record, None, spec, paths, self.config)
        # counters are deltas since the previous flush: reading the file from its start
        # rebuilds the totals of the process's whole life
        return vmm

    # ---- internals

    async def _launch(
        self, vm_id: str, spec: VMSpec, paths: VMPaths, boot: BootOptions, restored: bool
    ) -> tuple[FirecrackerVMM, dict[str, str]]:
        """Start the process, record it, wait for its API; return the handle and file names."""
        cfg = self.config
        binary = resolve_binary(cfg.binary)
        if binary is None:
            raise DriverUnavailable(MISSING_BINARY)
        paths.root.mkdir(parents=True, exist_ok=True)
        console_offset = paths.console.stat().st_size if paths.console.exists() else 0
        facts: dict[str, Any] = {"console_offset": console_offset, "restored": restored}
        if cfg.jailer is None:
            socket = paths.control_socket
            facts["log_path"] = str(paths.vmm_log)
            facts["metrics_path"] = str(paths.root / METRICS_FILE)
            files = self._host_files(spec)
            argv = [binary, "--api-sock", str(socket), "--id", vm_id]
        else:
            jc = cfg.jailer
            uid, gid = _jail_ids(jc, boot)
            jail = jl.jail_paths(jc.chroot_base, binary, vm_id)
            socket = jail.api_socket
            files = await asyncio.to_thread(self._jail_files, spec, jail, uid, gid)
            facts["jail_uid"], facts["jail_gid"] = uid, gid
            facts["jail_root"] = str(jail.root)
            facts["log_path"] = str(jail.host("/vmm.log"))
            facts["metrics_path"] = str(jail.host("/" + METRICS_FILE))
            memory = None
            if jc.memory_overhead_mib is not None:
                memory = spec.memory_mib * MiB + jc.memory_overhead_mib * MiB
            argv = jl.jailer_argv(
                jailer=resolve_binary(jc.binary) or jc.binary,
                exec_file=binary,
                vm_id=vm_id,
                uid=uid,
                gid=gid,
                firecracker_args=["--api-sock", jl.JAIL_API_SOCKET],
                chroot_base=jc.chroot_base,
                cgroup_version=jc.version(),
                cpu_percent=jc.cpu_percent,
                memory_bytes=memory,
                cgroups=jc.cgroups,
                parent_cgroup=jc.parent_cgroup,
                netns=jc.netns,
                daemonize=jc.daemonize,
                new_pid_ns=jc.new_pid_ns,
            )
        if len(os.fsencode(socket)) > UNIX_PATH_MAX:
            raise DriverError(
                f"API socket path {socket} is longer than the {UNIX_PATH_MAX} bytes a Unix "
                "socket path may have: use a shorter VM or jail directory"
            )
        # Firecracker refuses to start when its socket path exists
        with contextlib.suppress(FileNotFoundError):
            socket.unlink()
        try:
            popen = spawn_detached(argv, paths.console, cwd=paths.root, env=minimal_env())
        except OSError as exc:
            raise BootFailed(f"cannot start {argv[0]}: {exc}") from exc
        child: subprocess.Popen[bytes] | None = popen
        pid = popen.pid
        if cfg.jailer is not None and (cfg.jailer.daemonize or cfg.jailer.new_pid_ns):
            pid = await self._jailed_pid(
                jl.jail_paths(cfg.jailer.chroot_base, binary, vm_id), popen
            )
            child = None  # the jailer forked: Firecracker is not our child
        start_time = read_start_time(pid)
        record = ProcessRecord(
            pid=pid,
            start_time=start_time if start_time is not None else -1,
            control_socket=str(socket),
            accel="kvm",
            argv=tuple(argv),
            facts=facts,
        )
        paths.pidfile.write_text(f"{pid}\n")
        vmm = FirecrackerVMM(record, child, spec, paths, cfg)
        waiter = asyncio.ensure_future(vmm.api.wait_socket(cfg.socket_timeout_s))
        exited: asyncio.Future[Any] = vmm.exited
        done, _ = await asyncio.wait({waiter, exited}, return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError, DriverError):
                await waiter
            await vmm.close()
            raise vmm.boot_failure("Firecracker exited before its API answered")
        try:
            waiter.result()
        except DriverError as exc:
            await self._abort(vmm)
            raise BootFailed(str(exc)) from exc
        return vmm, files

    async def _jailed_pid(self, jail: jl.JailPaths, child: subprocess.Popen[bytes]) -> int:
        """With --daemonize/--new-pid-ns the jailer forks; it writes Firecracker's pid to a file."""
        deadline = time.monotonic() + self.config.socket_timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError, ValueError):
                pid = int(jail.pidfile.read_text().strip())
                with contextlib.suppress(subprocess.TimeoutExpired):
                    await asyncio.to_thread(child.wait, 1.0)
                return pid
            if child.poll() not in (None, 0):
                raise BootFailed(f"jailer failed: {exit_reason(child.returncode)}")
            await asyncio.sleep(0.01)
        raise BootFailed(f"the jailer wrote no pid file at {jail.pidfile}")

    def _host_files(self, spec: VMSpec) -> dict[str, str]:
        """Paths as Firecracker sees them without a jail: the host paths themselves."""
        files = {"kernel": spec.kernel}
        if spec.initrd:
            files["initrd"] = spec.initrd
        for drive_id, i, _ in drive_layout(spec):
            files[drive_id] = spec.drives[i].path
        return files

    def _jail_files(self, spec: VMSpec, jail: jl.JailPaths, uid: int, gid: int) -> dict[str, str]:
        """Put kernel, initrd and disks into the jail; return their in-jail paths.

        Read-only files are copied (reflinked where the file system can). A writable drive is
        bind-mounted: the VM writes the disk itself, not a copy that would vanish with the
        jail, so it must already be writable by the VM's uid; stoker never re-owns a pool
        image to make it so.
        """
        if jail.base.exists():  # left by an earlier run of this VM (an agent that died)
            jl.clean_jail(jail)
        jl.prepare_jail(jail, uid, gid)
        files = {
            "kernel": jl.place_in_jail(Path(spec.kernel), jail, "vmlinux", uid, gid, writable=False)
        }
        if spec.initrd:
            files["initrd"] = jl.place_in_jail(
                Path(spec.initrd), jail, "initrd", uid, gid, writable=False
            )
        for drive_id, i, _ in drive_layout(spec):
            drive = spec.drives[i]
            if drive.read_only:
                files[drive_id] = jl.place_in_jail(
                    Path(drive.path), jail, drive_id, uid, gid, writable=False
                )
                continue
            if not os.access(drive.path, os.W_OK) or os.stat(drive.path).st_uid != uid:
                raise DriverError(
                    f"drive {i} ({drive.path}) is writable for the VM, so the jailed "
                    f"Firecracker writes the file itself and it must belong to the VM's uid "
                    f"{uid} (chown {uid}:{gid} it, or mark the drive read_only); stoker never "
                    "re-owns a pool image"
                )
            files[drive_id] = jl.place_in_jail(
                Path(drive.path), jail, drive_id, uid, gid, writable=True, method="bind"
            )
        return files

    def _link_snapshot(self, vmm: FirecrackerVMM, state: Path) -> dict[str, str]:
        root = vmm.jail_root
        if root is None or self.config.jailer is None:
            return {n: str(state / n) for n in (SNAPSHOT_STATE, SNAPSHOT_MEMORY)}
        uid, gid = int(vmm.record.facts["jail_uid"]), int(vmm.record.facts["jail_gid"])
        jail = jl.JailPaths(base=root.parent, root=root)
        return {
            n: jl.place_in_jail(state / n, jail, n, uid, gid, writable=False)
            for n in (SNAPSHOT_STATE, SNAPSHOT_MEMORY)
        }

    async def _logging(self, vmm: FirecrackerVMM) -> None:
        """Logger and metrics: the only resources allowed before a snapshot load, too."""
        for f in (vmm.log_path, vmm.metrics_path):
            f.touch(exist_ok=True)  # Firecracker opens these files but never creates them
            if "jail_uid" in vmm.record.facts and os.geteuid() == 0:
                os.chown(f, int(vmm.record.facts["jail_uid"]), int(vmm.record.facts["jail_gid"]))
        await vmm.api.put_logger(vmm._in_vmm(vmm.log_path), level=self.config.log_level)
        await vmm.api.put_metrics(vmm._in_vmm(vmm.metrics_path))

    async def _configure(
        self,
        vmm: FirecrackerVMM,
        vm_id: str,
        spec: VMSpec,
        files: dict[str, str],
        boot: BootOptions,
    ) -> None:
        """The quota's limits go into the boot configuration (``boot.io_limits``): a
        Firecracker drive or interface has its rate limiter from its first I/O."""
        cfg = self.config
        api = vmm.api
        limits = boot.io_limits or IOLimits()
        await api.put_machine_config(
            spec.vcpus, spec.memory_mib, track_dirty_pages=cfg.track_dirty_pages
        )
        await api.put_boot_source(
            files["kernel"], boot_args(spec.cmdline, cfg.arch), files.get("initrd")
        )
        disk = disk_rate_limiter(_nz(limits.disk_bytes_per_s), _nz(limits.disk_iops))
        for drive_id, i, is_root in drive_layout(spec):
            await api.put_drive(
                drive_id,
                files[drive_id],
                is_root_device=is_root,
                is_read_only=spec.drives[i].read_only,
                rate_limiter=disk,
            )
        nic = _nic(spec, boot)
        if nic is not None:
            net = rate_limiter(_nz(limits.net_mbps), _nz(limits.net_pps))
            await api.put_network_interface(
                IFACE_ID,
                nic[0],
                nic[1],
                rx_rate_limiter=net,
                tx_rate_limiter=net,
            )
        if cfg.balloon_mib is not None:
            await api.put_balloon(cfg.balloon_mib, deflate_on_oom=True)
        if cfg.vsock_cid is not None:
            uds = vmm.paths.root / "vsock.sock" if vmm.jail_root is None else None
            await api.put_vsock(cfg.vsock_cid(vm_id), str(uds) if uds else "/vsock.sock")
        if cfg.entropy:
            await api.put_entropy()
        await self._logging(vmm)
        await api.instance_start()

    async def _abort(self, vmm: FirecrackerVMM) -> None:
        """Kill a VMM that cannot be used, wait briefly for its exit, drop the connection."""
        await vmm.kill()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(vmm.exited), 2.0)
        await vmm.api.aclose()


def _per_second(limiter: dict[str, Any] | None, bucket: str) -> int:
    """A token bucket's sustained rate (size per refill time) in units per second."""
    spec = (limiter or {}).get(bucket) or {}
    size, refill_ms = int(spec.get("size", 0)), int(spec.get("refill_time", 0))
    return round(size * 1000 / refill_ms) if size and refill_ms else 0


def _has_nic(spec: VMSpec) -> bool:
    return spec.network.mode in (NetworkMode.TAP, NetworkMode.MANAGED)


def _nic(spec: VMSpec, boot: BootOptions) -> tuple[str, str | None] | None:
    """(host TAP name, MAC) of the VM's interface: the operator's TAP, or the one the network
    service attached on a managed network."""
    if spec.network.mode == NetworkMode.TAP and spec.network.tap:
        return spec.network.tap, spec.network.mac
    if spec.network.mode == NetworkMode.MANAGED:
        if boot.network is None:  # never boot a VM meant to be on a network without its NIC
            raise DriverError(
                f"VM {spec.name} is on managed network {spec.network.name!r} but no TAP was "
                "attached for it: start it through the agent, whose network service makes one"
            )
        return boot.network.tap, boot.network.mac
    return None


def _jail_ids(jailer: JailerConfig, boot: BootOptions) -> tuple[int, int]:
    """The VM's own ids when confinement gives it some, else the jailer's configured ones."""
    if boot.identity is not None:
        return boot.identity.uid, boot.identity.gid
    if jailer.uid is not None and jailer.gid is not None:
        return jailer.uid, jailer.gid
    raise DriverError(
        "the jailer needs a uid and gid: turn [security] confine on (each VM gets its own) "
        "or set them in the jailer settings"
    )


def image_paths(spec: VMSpec) -> list[tuple[str, str]]:
    """(field, path) of every file a spec names."""
    named = [("kernel", spec.kernel)]
    if spec.initrd:
        named.append(("initrd", spec.initrd))
    named += [(f"drives[{i}].path", d.path) for i, d in enumerate(spec.drives)]
    return named
