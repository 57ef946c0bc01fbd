"""Per-VM cgroups on cgroup v1 and v2, with loud failures.

Each VMM gets its own cgroup under a parent (``stoker`` by default) so CPU, memory and disk I/O
caps apply to the process that is the VM. Hosts differ: most current ones are v2 only, some
(this one) are v1 with an empty unified hierarchy. Both speak different files for the same
limits, so the backends share one base class (construction, argument checks) and one writer.

The scripts this replaces silenced write errors and reported success. Here every write goes
through :func:`write_file`, which raises :class:`CgroupError` naming the file and the value.
"""

from __future__ import annotations

import errno
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

DEFAULT_ROOT = Path("/sys/fs/cgroup")
CPU_PERIOD_US = 100_000
V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "blkio")
V2_CONTROLLERS = ("cpu", "memory", "io")
#: v1 keeps each throttle in its own blkio file
V1_IO_FILES = {
    "riops": "read_iops_device",
    "wiops": "write_iops_device",
    "rbps": "read_bps_device",
    "wbps": "write_bps_device",
}

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_HEX_RE = re.compile(r"^[0-9a-fA-F]{1,128}$")
_DEVICE_RE = re.compile(r"^\d+:\d+$")


class CgroupError(RuntimeError):
    """A cgroup operation failed; the message says which file and which value."""


class ControllerUnavailable(CgroupError):
    """The hierarchy lacks a controller we need (e.g. cpu bound to v1 on a hybrid host)."""


class CgroupMode(StrEnum):
    V1 = "v1"
    V2 = "v2"
    NONE = "none"


@dataclass(frozen=True)
class CpuStats:
    usage_usec: int
    nr_periods: int
    nr_throttled: int
    throttled_usec: int


@dataclass(frozen=True)
class MemoryEvents:
    """Counters since creation. On v1 ``high`` is always 0 (soft limits count nothing),
    ``max`` is memory.failcnt and ``oom`` equals ``oom_kill`` (v1 counts only kills)."""

    high: int
    max: int
    oom: int
    oom_kill: int


Writer = Callable[[Path, str], None]
_Counters = TypeVar("_Counters", CpuStats, MemoryEvents)


def write_file(path: Path, value: str) -> None:
    """Write ``value`` in one write(2) to an existing control file; raise on any failure.

    One syscall because the kernel parses each write separately; no O_CREAT because a control
    file that does not exist is a bug (wrong controller, wrong version), not something to make.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    except OSError as exc:
        raise CgroupError(f"cannot write {value!r} to {path}: {exc.strerror}") from exc
    try:
        written = os.write(fd, value.encode())
        if written != len(value.encode()):
            raise CgroupError(f"short write of {value!r} to {path}: {written} bytes")
    except OSError as exc:
        raise CgroupError(f"cannot write {value!r} to {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise CgroupError(f"cannot read {path}: {exc.strerror}") from exc


def _read_keyed(path: Path) -> dict[str, int]:
    """Parse "key value" lines (cpu.stat, memory.events, memory.oom_control)."""
    out: dict[str, int] = {}
    for line in _read(path).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _read_counters(record: type[_Counters], path: Path) -> _Counters:
    """A v2 counters file whose keys are the record's field names; a key not there counts 0
    (older kernels lack some)."""
    values = _read_keyed(path)
    return record(**{f.name: values.get(f.name, 0) for f in fields(record)})


def _read_int(path: Path) -> int:
    text = _read(path).strip()
    try:
        return int(text)
    except ValueError as exc:
        raise CgroupError(f"unexpected content {text!r} in {path}") from exc


def validate_vm_id(vm_id: str) -> str:
    """Accept only names that cannot escape the parent directory ("..", "/", NUL...)."""
    if not (_NAME_RE.fullmatch(vm_id) or _HEX_RE.fullmatch(vm_id)):
        raise ValueError(f"invalid VM id {vm_id!r}: want ^[a-z0-9][a-z0-9-]{{0,62}}$ or a hex id")
    return vm_id


def _validate_parent(parent: str) -> str:
    for part in parent.split("/"):
        if not _NAME_RE.fullmatch(part):
            raise ValueError(f"invalid cgroup parent {parent!r}")
    return parent


def _validate_device(device: str) -> str:
    if not _DEVICE_RE.fullmatch(device):
        raise ValueError(f"device must be 'MAJ:MIN', not {device!r}")
    return device


def _cpu_quota_us(percent: float) -> int:
    """Percent of one CPU per period: 200 -> 200000 us per 100000 us."""
    if not percent > 0:
        raise ValueError(f"cpu percent must be positive, not {percent}")
    quota = round(percent * CPU_PERIOD_US / 100)
    if quota < 1000:
        raise ValueError(f"cpu percent {percent} gives a quota under the kernel's 1000 us minimum")
    return quota


def _check_memory(max_bytes: int | None, high_bytes: int | None) -> None:
    for name, value in (("max_bytes", max_bytes), ("high_bytes", high_bytes)):
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be positive, not {value}")
    if max_bytes is not None and high_bytes is not None and high_bytes > max_bytes:
        raise ValueError(f"high_bytes {high_bytes} above max_bytes {max_bytes}")


def _check_io(values: Iterable[int | None]) -> None:
    for value in values:
        if value is not None and value < 0:
            raise ValueError(f"I/O limits must be non-negative, not {value}")


def _pids(procs_file: Path) -> list[int]:
    if not procs_file.exists():
        return []
    return [int(p) for p in _read(procs_file).split()]


def _move(backend: CgroupBackend, procs_file: Path, pid: int) -> None:
    """Move ``pid`` into the cgroup of ``procs_file`` unless it is there already: a move
    takes the kernel's cgroup lock for writing, which waits for an RCU grace period (4-15 ms
    on the hosts stoker is measured on), and a VMM is placed at spawn and again once up."""
    if pid not in _pids(procs_file):
        backend.write(procs_file, str(pid))


#: per-device throttles in v2 order, by v2 key; None means "no limit" (spelled per version)
IOLimits = tuple[tuple[str, int | None], ...]


class CgroupBackend(ABC):
    """One VM cgroup per VM id, on either version.

    The shared part is construction and checking every argument before any write, so a bad
    value never leaves a cgroup half-configured; each version writes its own files.
    """

    mode: CgroupMode

    def __init__(
        self, root: Path = DEFAULT_ROOT, parent: str = "stoker", writer: Writer = write_file
    ) -> None:
        self.root = Path(root)
        self.parent = _validate_parent(parent)
        self.write = writer

    @abstractmethod
    def path(self, vm_id: str) -> Path: ...
    @abstractmethod
    def create(self, vm_id: str) -> None: ...
    @abstractmethod
    def add_process(self, vm_id: str, pid: int) -> None: ...
    @abstractmethod
    def set_cpu_percent(self, vm_id: str, percent: float | None) -> None: ...
    @abstractmethod
    def read_cpu_stats(self, vm_id: str) -> CpuStats: ...
    @abstractmethod
    def read_memory_events(self, vm_id: str) -> MemoryEvents: ...
    @abstractmethod
    def read_memory_current(self, vm_id: str) -> int: ...
    @abstractmethod
    def remove(self, vm_id: str, move_strays: bool = False) -> None: ...

    def set_memory(self, vm_id: str, max_bytes: int | None, high_bytes: int | None) -> None:
        _check_memory(max_bytes, high_bytes)
        self._write_memory(vm_id, max_bytes, high_bytes)

    def set_io(
        self,
        vm_id: str,
        device: str,
        riops: int | None = None,
        wiops: int | None = None,
        rbps: int | None = None,
        wbps: int | None = None,
    ) -> None:
        _validate_device(device)
        limits = (("riops", riops), ("wiops", wiops), ("rbps", rbps), ("wbps", wbps))
        _check_io(value for _, value in limits)
        self._write_io(vm_id, device, limits)

    @abstractmethod
    def _write_memory(self, vm_id: str, max_bytes: int | None, high_bytes: int | None) -> None: ...
    @abstractmethod
    def _write_io(self, vm_id: str, device: str, limits: IOLimits) -> None: ...


class V2Cgroups(CgroupBackend):
    """One directory per VM under <root>/<parent> in the unified hierarchy."""

    mode = CgroupMode.V2

    def path(self, vm_id: str) -> Path:
        return self.root / self.parent / validate_vm_id(vm_id)

    def _enable_controllers(self, cgroup: Path) -> None:
        """Delegate cpu, memory and io to ``cgroup``'s children, if not already."""
        available = _read(cgroup / "cgroup.controllers").split()
        missing = [c for c in V2_CONTROLLERS if c not in available]
        if missing:
            raise ControllerUnavailable(
                f"controller(s) {', '.join(missing)} not available in cgroup v2 at {cgroup} "
                f"(cgroup.controllers: {' '.join(available) or 'empty'}); on a hybrid host "
                "they are bound to the v1 hierarchies"
            )
        enabled = _read(cgroup / "cgroup.subtree_control").split()
        if any(c not in enabled for c in V2_CONTROLLERS):
            self.write(cgroup / "cgroup.subtree_control", " ".join(f"+{c}" for c in V2_CONTROLLERS))

    def create(self, vm_id: str) -> None:
        target = self.path(vm_id)
        self._enable_controllers(self.root)
        level = self.root
        # every level between root and the VM must pass the controllers down
        for part in self.parent.split("/"):
            level = level / part
            _mkdir(level)
            self._enable_controllers(level)
        _mkdir(target)

    def add_process(self, vm_id: str, pid: int) -> None:
        _move(self, self.path(vm_id) / "cgroup.procs", pid)

    def set_cpu_percent(self, vm_id: str, percent: float | None) -> None:
        quota = "max" if percent is None else str(_cpu_quota_us(percent))
        self.write(self.path(vm_id) / "cpu.max", f"{quota} {CPU_PERIOD_US}")

    def _write_memory(self, vm_id: str, max_bytes: int | None, high_bytes: int | None) -> None:
        base = self.path(vm_id)
        self.write(base / "memory.high", "max" if high_bytes is None else str(high_bytes))
        self.write(base / "memory.max", "max" if max_bytes is None else str(max_bytes))

    def _write_io(self, vm_id: str, device: str, limits: IOLimits) -> None:
        fields = " ".join(f"{key}={'max' if value is None else value}" for key, value in limits)
        self.write(self.path(vm_id) / "io.max", f"{device} {fields}")

    def read_cpu_stats(self, vm_id: str) -> CpuStats:
        return _read_counters(CpuStats, self.path(vm_id) / "cpu.stat")

    def read_memory_events(self, vm_id: str) -> MemoryEvents:
        return _read_counters(MemoryEvents, self.path(vm_id) / "memory.events")

    def read_memory_current(self, vm_id: str) -> int:
        return _read_int(self.path(vm_id) / "memory.current")

    def remove(self, vm_id: str, move_strays: bool = False) -> None:
        """rmdir the VM's cgroup; processes still in it are refused, or moved to the parent."""
        target = self.path(vm_id)
        if not target.exists():
            return
        strays = _pids(target / "cgroup.procs")
        if strays and not move_strays:
            raise CgroupError(f"cannot remove {target}: processes still in it: {strays}")
        for pid in strays:
            # v2 forbids processes in an inner node with controllers; the root is exempt
            self.write(self.root / "cgroup.procs", str(pid))
        _rmdir(target)


class V1Cgroups(CgroupBackend):
    """One directory per VM in each of the cpu, cpuacct, memory and blkio hierarchies."""

    mode = CgroupMode.V1

    def __init__(
        self,
        root: Path = DEFAULT_ROOT,
        parent: str = "stoker",
        writer: Writer = write_file,
        controllers: tuple[str, ...] = V1_CONTROLLERS,
    ) -> None:
        super().__init__(root, parent, writer)
        self.controllers = controllers

    def path(self, vm_id: str, controller: str = "cpu") -> Path:
        return self.root / controller / self.parent / validate_vm_id(vm_id)

    def _dirs(self, vm_id: str) -> list[Path]:
        """One directory per distinct hierarchy (cpu and cpuacct may be co-mounted)."""
        seen: set[Path] = set()
        out = []
        for controller in self.controllers:
            mount = self.root / controller
            if not (mount / "cgroup.procs").exists():
                raise ControllerUnavailable(
                    f"cgroup v1 controller {controller} not mounted at {mount}"
                )
            key = mount.resolve()
            if key not in seen:
                seen.add(key)
                out.append(self.path(vm_id, controller))
        return out

    def create(self, vm_id: str) -> None:
        for directory in self._dirs(vm_id):
            _mkdir(directory, parents=True)

    def add_process(self, vm_id: str, pid: int) -> None:
        for directory in self._dirs(vm_id):
            _move(self, directory / "cgroup.procs", pid)

    def set_cpu_percent(self, vm_id: str, percent: float | None) -> None:
        base = self.path(vm_id, "cpu")
        quota = -1 if percent is None else _cpu_quota_us(percent)
        self.write(base / "cpu.cfs_period_us", str(CPU_PERIOD_US))
        self.write(base / "cpu.cfs_quota_us", str(quota))

    def _write_memory(self, vm_id: str, max_bytes: int | None, high_bytes: int | None) -> None:
        base = self.path(vm_id, "memory")
        self.write(base / "memory.limit_in_bytes", "-1" if max_bytes is None else str(max_bytes))
        soft = "-1" if high_bytes is None else str(high_bytes)
        self.write(base / "memory.soft_limit_in_bytes", soft)

    def _write_io(self, vm_id: str, device: str, limits: IOLimits) -> None:
        """One file per limit; 0 removes a v1 throttle, so None is written as 0."""
        base = self.path(vm_id, "blkio")
        for key, value in limits:
            self.write(base / f"blkio.throttle.{V1_IO_FILES[key]}", f"{device} {value or 0}")

    def read_cpu_stats(self, vm_id: str) -> CpuStats:
        usage_ns = _read_int(self.path(vm_id, "cpuacct") / "cpuacct.usage")
        stat = _read_keyed(self.path(vm_id, "cpu") / "cpu.stat")
        return CpuStats(
            usage_usec=usage_ns // 1000,
            nr_periods=stat.get("nr_periods", 0),
            nr_throttled=stat.get("nr_throttled", 0),
            throttled_usec=stat.get("throttled_time", 0) // 1000,
        )

    def read_memory_events(self, vm_id: str) -> MemoryEvents:
        base = self.path(vm_id, "memory")
        oom_kill = _read_keyed(base / "memory.oom_control").get("oom_kill", 0)
        return MemoryEvents(
            high=0, max=_read_int(base / "memory.failcnt"), oom=oom_kill, oom_kill=oom_kill
        )

    def read_memory_current(self, vm_id: str) -> int:
        return _read_int(self.path(vm_id, "memory") / "memory.usage_in_bytes")

    def remove(self, vm_id: str, move_strays: bool = False) -> None:
        """rmdir in every hierarchy, after checking all of them, so none is left half-removed."""
        dirs = [d for d in self._dirs(vm_id) if d.exists()]
        strays = {d: _pids(d / "cgroup.procs") for d in dirs}
        busy = {str(d): p for d, p in strays.items() if p}
        if busy and not move_strays:
            raise CgroupError(f"cannot remove cgroup {vm_id}: processes still in it: {busy}")
        for directory, pids in strays.items():
            for pid in pids:
                self.write(directory.parent / "cgroup.procs", str(pid))
        removed: list[str] = []
        for directory in dirs:
            try:
                _rmdir(directory)
            except CgroupError as exc:
                raise CgroupError(f"{exc} (already removed: {removed or 'none'})") from exc
            removed.append(str(directory))


def _mkdir(directory: Path, parents: bool = False) -> None:
    try:
        directory.mkdir(parents=parents, exist_ok=True)
    except OSError as exc:
        raise CgroupError(f"cannot create cgroup {directory}: {exc.strerror}") from exc


def _rmdir(directory: Path) -> None:
    """rmdir only: a cgroup's control files vanish with it, and a real directory tree
    here would be a bug, not something to delete recursively."""
    try:
        directory.rmdir()
    except FileNotFoundError:
        return
    except OSError as exc:
        hint = " (it still has processes or child cgroups)" if exc.errno == errno.EBUSY else ""
        raise CgroupError(f"cannot remove cgroup {directory}: {exc.strerror}{hint}") from exc


def detect(root: Path = DEFAULT_ROOT) -> CgroupMode:
    """v2 when root itself is the unified hierarchy; v1 when controllers are mounted under it.

    A hybrid host (v1 controllers plus an empty cgroup2 at root/unified) counts as v1, since
    the unified hierarchy there has none of the controllers we need.
    """
    root = Path(root)
    if (root / "cgroup.controllers").exists():
        return CgroupMode.V2
    if any((root / c / "cgroup.procs").exists() for c in ("cpu", "memory")):
        return CgroupMode.V1
    return CgroupMode.NONE


def backend_for(root: Path = DEFAULT_ROOT, parent: str = "stoker") -> CgroupBackend:
    """The backend matching this host; refuses a host with no usable cgroups."""
    mode = detect(root)
    if mode is CgroupMode.V2:
        return V2Cgroups(root, parent)
    if mode is CgroupMode.V1:
        return V1Cgroups(root, parent)
    raise CgroupError(f"no cgroup v1 controllers or cgroup v2 hierarchy found under {root}")
