"""The Firecracker jailer: command line, jail layout, and what the caller must do around it.

The jailer chroots Firecracker under ``<chroot_base>/<exec name>/<id>/root``, drops to
``--uid``/``--gid``, joins ``--netns`` and puts the process in a cgroup. It does not put the
kernel or disks in the jail, nor remove the jail afterwards: that is the caller's job, done
here. Everything Firecracker is told through its API is a path *inside* the jail. Files go
into the jail as private copies (or bind mounts), never as hard links of the original.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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


PlaceMethod = Literal["copy", "bind"]


def place_in_jail(
    src: Path,
    jail: JailPaths,
    name: str,
    uid: int,
    gid: int,
    *,
    writable: bool = True,
    method: PlaceMethod = "copy",
) -> str:
    """Put ``src`` into the jail root as ``name`` for the jailed uid; return the in-jail path.

    The original is never re-owned, re-moded or hard-linked: a hard link shares the inode,
    so chowning it for the jailed user would hand the original (a pool image, another VM's
    disk) to that user. ``copy`` makes a private copy (``cp --reflink=auto``: free on
    reflink file systems such as XFS or Btrfs) owned by ``uid``:``gid``, 0600 (0400 when
    not ``writable``); it is staged outside the chroot and renamed in, so a symlink planted
    at ``name`` by the jailed user is replaced, never followed. ``bind`` bind-mounts the
    original (read-only unless ``writable``) and keeps its owner: only for files the jailed
    uid may already open, such as a VM's own disk owned by its uid. A copy of a writable
    disk is the disk the VM writes: keep it, or copy it back, if the writes must last.
    """
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"jail file name must be a plain file name: {name!r}")
    if method not in ("copy", "bind"):
        raise ValueError(f"method must be 'copy' or 'bind', not {method!r}")
    if not src.is_file():
        raise FileNotFoundError(f"{src} is not a regular file")
    dest = jail.root / name
    if method == "bind":
        _bind_into(src, dest, writable)
        return "/" + name
    staging = jail.base / ".staging"
    staging.mkdir(mode=0o700, exist_ok=True)
    staged = staging / name
    staged.unlink(missing_ok=True)
    done = subprocess.run(
        ["cp", "--reflink=auto", "--sparse=always", "--", str(src), str(staged)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "LANG": "C"},
        check=False,
    )
    if done.returncode != 0:
        raise OSError(f"copying {src} into the jail failed: {done.stderr.strip()}")
    _chown(staged, uid, gid)
    os.chmod(staged, 0o600 if writable else 0o400)
    os.rename(staged, dest)
    return "/" + name


def link_into_jail(src: Path, jail: JailPaths, name: str, uid: int, gid: int) -> str:
    """Kept for callers of the old name: it copies now (see ``place_in_jail``), never links."""
    return place_in_jail(src, jail, name, uid, gid)


def _bind_into(src: Path, dest: Path, writable: bool) -> None:
    with contextlib.suppress(FileNotFoundError):
        dest.unlink()
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.close(fd)
    _mount(["--bind", str(src), str(dest)])
    if not writable:
        _mount(["-o", "remount,bind,ro,nosuid,nodev", str(dest)])


def _mount(args: Sequence[str], tool: str = "mount") -> None:
    done = subprocess.run(
        [tool, *args], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, check=False
    )
    if done.returncode != 0:
        raise OSError(f"{tool} {' '.join(args)} failed: {done.stderr.strip()}")


def mounts_under(base: Path, mountinfo: str | None = None) -> list[Path]:
    """Mount points at or below ``base``, deepest first (from /proc/self/mountinfo)."""
    text = mountinfo if mountinfo is not None else Path("/proc/self/mountinfo").read_text()
    found = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        # the mount point is octal-escaped: "\040" for a space, and so on
        point = Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]))
        if point == base or base in point.parents:
            found.append(point)
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def clean_jail(jail: JailPaths, cgroup_dirs: Sequence[Path] = ()) -> None:
    """Remove the jail (copies, sockets, snapshots left inside) and the VM's empty cgroups.

    Only call this after Firecracker exited. Bind mounts are unmounted first, and nothing is
    removed while one remains: deleting through a mount would delete the original.
    """
    if jail.base.name in ("", "/") or len(jail.base.parts) < 3:
        raise ValueError(f"refusing to remove suspicious jail path {jail.base}")
    for point in mounts_under(jail.base):
        _mount([str(point)], tool="umount")
    left = mounts_under(jail.base)
    if left:
        raise OSError(f"not removing {jail.base}: still mounted at {', '.join(map(str, left))}")
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
