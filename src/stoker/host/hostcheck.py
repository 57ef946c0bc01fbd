"""What ``stoker doctor`` asks of this host: versions, devices, cgroups, tools, the data dir
and the kernel's clock state. Facts only; ``stoker.domain.doctor`` judges them."""

from __future__ import annotations

import ctypes
import grp
import os
import shutil
import stat
import subprocess
from pathlib import Path

from stoker.domain.doctor import ClockFacts, DataDirFacts, HostFacts, KvmDeviceFacts
from stoker.host import cgroups
from stoker.host.kvm import KVM_DEVICE, probe_kvm

#: the commands doctor looks for on PATH
COMMANDS = ("tc", "nft", "dnsmasq", "qemu-img", "unshare", "setpriv")
#: adjtimex(2) answers TIME_ERROR when the clock is not synchronised
TIME_ERROR = 5
STA_UNSYNC = 0x0040


def gather(
    data_dir: Path,
    qemu_binary: str = "qemu-system-x86_64",
    confine: bool = True,
    confine_mode: str = "namespace",
) -> HostFacts:
    version, error = qemu_version(qemu_binary)
    kvm = probe_kvm()
    mode, controllers = cgroup_controllers()
    return HostFacts(
        euid=os.geteuid(),
        qemu_binary=qemu_binary,
        qemu_version=version,
        qemu_error=error,
        kvm_usable=kvm.usable,
        kvm_reason=kvm.reason,
        kvm_device=kvm_device(),
        cgroup_mode=mode,
        cgroup_controllers=controllers,
        tools={name: shutil.which(name) for name in COMMANDS},
        data_dir=data_dir_facts(data_dir),
        clock=clock_state(),
        confine=confine,
        confine_mode=confine_mode,
    )


def qemu_version(binary: str) -> tuple[str | None, str | None]:
    """(the first line of ``--version``, None) or (None, why it could not be run)."""
    path = shutil.which(binary)
    if path is None:
        return None, f"{binary} is not on PATH"
    try:
        done = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, str(exc)
    if done.returncode != 0:
        return None, (done.stderr.strip() or f"exit status {done.returncode}")
    return done.stdout.strip(), None


def kvm_device(device: Path = Path(KVM_DEVICE)) -> KvmDeviceFacts:
    try:
        st = os.stat(device)
    except OSError:
        return KvmDeviceFacts(exists=False)
    try:
        group: str | None = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return KvmDeviceFacts(exists=True, group=group, mode=stat.S_IMODE(st.st_mode))


def cgroup_controllers(root: Path = cgroups.DEFAULT_ROOT) -> tuple[str, frozenset[str]]:
    """("v2", controllers enabled at the root) or ("v1", controllers mounted) or "none"."""
    mode = cgroups.detect(root)
    if mode is cgroups.CgroupMode.V2:
        try:
            names = (root / "cgroup.controllers").read_text().split()
        except OSError:
            names = []
        return "v2", frozenset(names)
    if mode is cgroups.CgroupMode.V1:
        names = [p.name for p in root.iterdir() if (p / "cgroup.procs").exists()]
        # v1 mounts "cpu,cpuacct" with links "cpu" and "cpuacct": count the names split;
        # "systemd" and "unified" are named hierarchies, not controllers
        split = {n for name in names for n in name.split(",")}
        return "v1", frozenset(split - {"systemd", "unified"})
    return "none", frozenset()


def data_dir_facts(path: Path) -> DataDirFacts:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        parent = _nearest_existing(path)
        return DataDirFacts(
            path=str(path),
            exists=False,
            free_bytes=_free(parent),
            writable=os.access(parent, os.W_OK | os.X_OK),
        )
    except OSError:
        return DataDirFacts(path=str(path), exists=True, writable=False)
    return DataDirFacts(
        path=str(path),
        exists=True,
        is_dir=stat.S_ISDIR(st.st_mode),
        owner_uid=st.st_uid,
        mode=stat.S_IMODE(st.st_mode),
        free_bytes=_free(path),
        writable=os.access(path, os.W_OK | os.X_OK),
    )


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def _free(path: Path) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class _Timex(ctypes.Structure):
    """struct timex (linux/timex.h) as glibc's adjtimex(2) takes it."""

    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time_sec", ctypes.c_long),
        ("time_usec", ctypes.c_long),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_reserved", ctypes.c_int * 11),
    ]


def clock_state() -> ClockFacts:
    """The kernel's own view (adjtimex with no changes): whatever NTP client keeps the clock
    (chrony, ntpd, systemd-timesyncd) tells the kernel, so no daemon needs asking."""
    timex = _Timex()  # modes = 0: read only
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        state = libc.adjtimex(ctypes.byref(timex))
    except (OSError, AttributeError) as exc:
        return ClockFacts(synchronized=None, detail=str(exc))
    if state < 0:
        return ClockFacts(synchronized=None, detail=os.strerror(ctypes.get_errno()))
    unsynced = state == TIME_ERROR or bool(timex.status & STA_UNSYNC)
    return ClockFacts(synchronized=not unsynced, max_error_us=int(timex.maxerror))
