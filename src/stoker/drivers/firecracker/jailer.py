"""The Firecracker jailer: command line, jail layout, and what the caller must do around it.

The jailer chroots Firecracker under ``<chroot_base>/<exec name>/<id>/root``, drops to
``--uid``/``--gid``, joins ``--netns`` and puts the process in a cgroup. It does not put the
kernel or disks in the jail, nor remove the jail afterwards: that is the caller's job, done
here. Everything Firecracker is told through its API is a path *inside* the jail.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from stoker.domain.units import cgroup_v2_cpu_max, cpu_percent_to_cfs

DEFAULT_CHROOT_BASE = Path("/srv/jailer")
#: where Firecracker's API socket lives, seen from inside the jail
JAIL_API_SOCKET = "/run/firecracker.socket"


@dataclass(frozen=True)
class JailPaths:
    """The jail directories of one microVM, and the host path of anything inside it."""

    base: Path  # <chroot_base>/<exec name>/<id>: removed whole by clean_jail
    root: Path  # <base>/root: the chroot

    def host(self, in_jail: str) -> Path:
        """Host path of a path as Firecracker sees it inside the chroot."""
        return self.root / in_jail.lstrip("/")

    @property
    def api_socket(self) -> Path:
        return self.host(JAIL_API_SOCKET)

    @property
    def pidfile(self) -> Path:
        """The jailer writes Firecracker's pid here: ``<exec name>.pid`` in the chroot."""
        return self.root / f"{self.base.parent.name}.pid"


def jail_paths(chroot_base: Path, exec_file: str | Path, vm_id: str) -> JailPaths:
    """The jailer's layout: ``<chroot_base>/<basename(exec_file)>/<vm_id>/root``."""
    base = Path(chroot_base) / Path(exec_file).name / vm_id
    return JailPaths(base=base, root=base / "root")


def cgroup_args(
    version: int,
    cpu_percent: int | None = None,
    memory_bytes: int | None = None,
    extra: Mapping[str, str] | None = None,
) -> list[str]:
    """``--cgroup <file>=<value>`` arguments in the vocabulary of cgroup ``version``.

    v2 caps CPU with ``cpu.max`` ("quota period") and memory with ``memory.max``; v1 with
    ``cpu.cfs_quota_us``/``cpu.cfs_period_us`` and ``memory.limit_in_bytes``. The memory figure
    must cover the VMM's overhead on top of guest RAM, or the OOM killer takes the VM.
    """
    if version not in (1, 2):
        raise ValueError(f"cgroup version must be 1 or 2, not {version}")
    pairs: list[tuple[str, str]] = []
    if cpu_percent is not None:
        if version == 2:
            pairs.append(("cpu.max", cgroup_v2_cpu_max(cpu_percent)))
        else:
            quota, period = cpu_percent_to_cfs(cpu_percent)
            pairs += [("cpu.cfs_period_us", str(period)), ("cpu.cfs_quota_us", str(quota))]
    if memory_bytes is not None:
        pairs.append(("memory.max" if version == 2 else "memory.limit_in_bytes", str(memory_bytes)))
    for key, value in (extra or {}).items():
        if "." not in key:
            raise ValueError(f"cgroup setting {key!r} must be <controller>.<file>")
        pairs.append((key, value))
    argv: list[str] = []
    for key, value in pairs:
        argv += ["--cgroup", f"{key}={value}"]
    return argv


def jailer_argv(
    *,
    jailer: str,
    exec_file: str,
    vm_id: str,
    uid: int,
    gid: int,
    firecracker_args: Sequence[str],
    chroot_base: Path = DEFAULT_CHROOT_BASE,
    cgroup_version: int = 1,
    cpu_percent: int | None = None,
    memory_bytes: int | None = None,
    cgroups: Mapping[str, str] | None = None,
    parent_cgroup: str | None = None,
    netns: str | None = None,
    daemonize: bool = False,
    new_pid_ns: bool = False,
) -> list[str]:
    """The jailer command line; ``firecracker_args`` follow ``--`` and go to Firecracker.

    The jailer passes ``--id`` to Firecracker itself, so ``firecracker_args`` must not repeat
    it; and it insists that the exec file's name contains "firecracker".
    """
    if "firecracker" not in Path(exec_file).name:
        raise ValueError(f"the jailer only runs files named like 'firecracker': {exec_file}")
    if "--id" in firecracker_args:
        raise ValueError("do not pass --id after '--': the jailer gives Firecracker its --id")
    argv = [
        jailer,
        "--id", vm_id,
        "--exec-file", exec_file,
        "--uid", str(uid),
        "--gid", str(gid),
        "--chroot-base-dir", str(chroot_base),
    ]  # fmt: skip
    if cgroup_version == 2:
        argv += ["--cgroup-version", "2"]
    argv += cgroup_args(cgroup_version, cpu_percent, memory_bytes, cgroups)
    if parent_cgroup:
        argv += ["--parent-cgroup", parent_cgroup]
    if netns:
        argv += ["--netns", netns]
    if daemonize:
        argv.append("--daemonize")
    if new_pid_ns:
        argv.append("--new-pid-ns")
    return [*argv, "--", *firecracker_args]


def prepare_jail(jail: JailPaths, uid: int, gid: int) -> None:
    """Create the chroot and its /run (for the API socket) owned by the jailed user."""
    for d in (jail.root, jail.host("/run")):
        d.mkdir(parents=True, exist_ok=True)
        _chown(d, uid, gid)


def link_into_jail(src: Path, jail: JailPaths, name: str, uid: int, gid: int) -> str:
    """Hard-link ``src`` into the jail root (copy across file systems); return the in-jail path.

    A hard link costs nothing and keeps one copy of a large disk; ownership must change so
    the unprivileged Firecracker can open it, which also changes the original (same inode).
    """
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"jail file name must be a plain file name: {name!r}")
    dest = jail.root / name
    with contextlib.suppress(FileNotFoundError):
        dest.unlink()
    try:
        os.link(src, dest)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        shutil.copy2(src, dest)
    _chown(dest, uid, gid)
    return "/" + name


def clean_jail(jail: JailPaths, cgroup_dirs: Sequence[Path] = ()) -> None:
    """Remove the jail (links, sockets, snapshots left inside) and the VM's empty cgroups.

    Only call this after Firecracker exited. Removing the hard links leaves the originals.
    """
    if jail.base.name in ("", "/") or len(jail.base.parts) < 3:
        raise ValueError(f"refusing to remove suspicious jail path {jail.base}")
    shutil.rmtree(jail.base, ignore_errors=True)
    for d in cgroup_dirs:
        with contextlib.suppress(FileNotFoundError, OSError):
            d.rmdir()


def cgroup_dirs(
    version: int,
    vm_id: str,
    parent_cgroup: str,
    controllers: Sequence[str] = ("cpu", "memory"),
    cgroup_root: Path = Path("/sys/fs/cgroup"),
) -> list[Path]:
    """The cgroup directories the jailer made for a VM (v2: one; v1: one per controller)."""
    if version == 2:
        return [cgroup_root / parent_cgroup / vm_id]
    return [cgroup_root / c / parent_cgroup / vm_id for c in controllers]


def _chown(path: Path, uid: int, gid: int) -> None:
    if os.geteuid() == 0:
        os.chown(path, uid, gid)
