"""``stoker doctor``'s verdicts: what the host has, judged against what stoker needs.

Pure: the facts are gathered by ``stoker.host.hostcheck``; each check here turns them into
one finding with, when something is wrong, what to do about it. A ``fail`` is something
the agent cannot work without (or refuses to start without); a ``warn`` costs a feature
(KVM speed, quotas, managed networks, trustworthy times).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from stoker.domain.units import GiB, format_size

#: the QEMU stoker is built and tested on (Debian 12); older ones lack what the driver uses
MIN_QEMU = (7, 2)
#: below this much free space in the data dir, a snapshot or a disk copy will not fit
MIN_FREE_BYTES = 1 * GiB
LOW_FREE_BYTES = 10 * GiB
#: a clock whose kernel error bound is larger than this makes schedule times untrustworthy
MAX_CLOCK_ERROR_US = 500_000


class Level(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Finding:
    check: str
    level: Level
    message: str
    fix: str | None = None


@dataclass(frozen=True)
class DataDirFacts:
    path: str
    exists: bool
    is_dir: bool = True
    owner_uid: int | None = None
    mode: int | None = None
    #: free bytes on its file system (of the nearest existing parent when it does not exist)
    free_bytes: int | None = None
    #: can this user create it (when it does not exist) or write in it
    writable: bool = False


@dataclass(frozen=True)
class ClockFacts:
    #: the kernel's word (adjtimex): None when it could not be asked
    synchronized: bool | None
    max_error_us: int | None = None
    detail: str = ""


@dataclass(frozen=True)
class KvmDeviceFacts:
    exists: bool
    group: str | None = None
    mode: int | None = None


@dataclass(frozen=True)
class HostFacts:
    euid: int
    qemu_binary: str
    qemu_version: str | None
    qemu_error: str | None
    kvm_usable: bool
    kvm_reason: str
    kvm_device: KvmDeviceFacts
    cgroup_mode: str  # "v1", "v2" or "none"
    cgroup_controllers: frozenset[str]
    #: command name -> its path, or None when it is not on PATH
    tools: Mapping[str, str | None]
    data_dir: DataDirFacts
    clock: ClockFacts
    #: the agent runs each VMM confined ([security] confine) and how ([security] mode)
    confine: bool = True
    confine_mode: str = "namespace"
    notes: tuple[str, ...] = field(default=())


def parse_qemu_version(text: str) -> tuple[int, int, int] | None:
    """``QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)`` -> (7, 2, 19)."""
    found = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", text)
    if found is None:
        return None
    major, minor, patch = found.groups()
    return int(major), int(minor), int(patch or 0)


def check_qemu(f: HostFacts) -> Finding:
    if f.qemu_version is None:
        return Finding(
            "qemu",
            Level.FAIL,
            f"{f.qemu_binary} cannot be run: {f.qemu_error or 'not found'}",
            "install QEMU (Debian: apt-get install qemu-system-x86), or set [qemu] binary",
        )
    version = parse_qemu_version(f.qemu_version)
    text = f.qemu_version.splitlines()[0]
    if version is None:
        return Finding("qemu", Level.WARN, f"unrecognised version text: {text!r}")
    if version[:2] < MIN_QEMU:
        need = ".".join(map(str, MIN_QEMU))
        return Finding(
            "qemu", Level.FAIL, f"{text}: older than {need}", f"install QEMU {need} or newer"
        )
    return Finding("qemu", Level.OK, text)


def check_kvm(f: HostFacts) -> Finding:
    if f.kvm_usable:
        return Finding("kvm", Level.OK, "usable: a test guest ran under KVM")
    if not f.kvm_device.exists:
        fix = "enable virtualisation (VT-x/AMD-V) in the firmware and load kvm_intel or kvm_amd"
    else:
        fix = (
            "guests will run under TCG (much slower); on a VM, enable nested virtualisation "
            "in its host"
        )
    return Finding("kvm", Level.WARN, f"not usable: {f.kvm_reason}", fix)


def check_kvm_group(f: HostFacts) -> Finding | None:
    """A namespace-confined QEMU opens /dev/kvm as the VM's own uid: it needs a group."""
    if not (f.confine and f.confine_mode == "namespace" and f.kvm_device.exists):
        return None
    mode = f.kvm_device.mode or 0
    if mode & 0o006 == 0o006 or (f.kvm_device.group and mode & 0o060 == 0o060):
        return Finding(
            "kvm access", Level.OK, f"/dev/kvm {oct(mode)} group {f.kvm_device.group or '?'}"
        )
    return Finding(
        "kvm access",
        Level.WARN,
        f"/dev/kvm is {oct(mode)} group {f.kvm_device.group or '?'}: confined VMMs cannot open it",
        "chgrp kvm /dev/kvm && chmod 0660 /dev/kvm (Debian's udev rule does this)",
    )


def check_cgroups(f: HostFacts) -> Finding:
    if f.cgroup_mode == "none":
        return Finding(
            "cgroups",
            Level.WARN,
            "no cgroup v1 controllers or v2 hierarchy under /sys/fs/cgroup",
            "mount cgroup2 at /sys/fs/cgroup: without it CPU and memory quotas cannot bind",
        )
    missing = sorted({"cpu", "memory"} - f.cgroup_controllers)
    have = ", ".join(sorted(f.cgroup_controllers)) or "none"
    if missing:
        return Finding(
            "cgroups",
            Level.WARN,
            f"{f.cgroup_mode}: controllers {have}; missing {', '.join(missing)}",
            f"enable the {' and '.join(missing)} controller(s) (v2: cgroup.subtree_control)",
        )
    return Finding("cgroups", Level.OK, f"{f.cgroup_mode}: controllers {have}")


#: tools the agent calls, with what is lost without them and where they come from
TOOLS: tuple[tuple[str, str, str, Level], ...] = (
    ("tc", "network bandwidth quotas on TAP devices", "iproute2", Level.WARN),
    ("nft", "managed networks (NAT and isolation rules)", "nftables", Level.WARN),
    ("dnsmasq", "managed networks (DHCP for guests)", "dnsmasq-base", Level.WARN),
    ("qemu-img", "snapshot checks of qcow2 images", "qemu-utils", Level.WARN),
)


def check_tools(f: HostFacts) -> list[Finding]:
    findings = []
    for name, used_for, package, level in TOOLS:
        path = f.tools.get(name)
        if path:
            findings.append(Finding(name, Level.OK, path))
        else:
            findings.append(
                Finding(
                    name,
                    level,
                    f"not found: no {used_for}",
                    f"install it (Debian: apt-get install {package})",
                )
            )
    return findings


def check_confinement(f: HostFacts) -> Finding:
    if not f.confine:
        return Finding(
            "confinement",
            Level.WARN,
            "off ([security] confine = false): every VMM runs as root",
            "set [security] confine = true outside development",
        )
    needed = ("unshare", "setpriv") if f.confine_mode == "namespace" else ()
    missing = [t for t in needed if not f.tools.get(t)]
    if missing:
        return Finding(
            "confinement",
            Level.FAIL,
            f"{' and '.join(missing)} not found: VMMs cannot be confined ({f.confine_mode} mode)",
            "install util-linux (Debian: apt-get install util-linux)",
        )
    if f.euid != 0:
        return Finding(
            "confinement",
            Level.FAIL,
            f"running as uid {f.euid}: confining VMMs under their own uids needs root",
            "run the agent as root (the systemd unit does)",
        )
    return Finding("confinement", Level.OK, f"{f.confine_mode} mode; unshare and setpriv found")


def check_data_dir(f: HostFacts) -> list[Finding]:
    d = f.data_dir
    findings: list[Finding] = []
    if d.exists and not d.is_dir:
        return [
            Finding(
                "data dir",
                Level.FAIL,
                f"{d.path} is not a directory",
                "move it away or set data_dir",
            )
        ]
    if not d.exists:
        if d.writable:
            findings.append(Finding("data dir", Level.OK, f"{d.path} will be made at first start"))
        else:
            findings.append(
                Finding(
                    "data dir",
                    Level.FAIL,
                    f"{d.path} does not exist and cannot be made by uid {f.euid}",
                    f"mkdir -m 0700 {d.path} as root, or set data_dir",
                )
            )
    elif d.owner_uid is not None and d.owner_uid != f.euid:
        findings.append(
            Finding(
                "data dir",
                Level.FAIL,
                f"{d.path} belongs to uid {d.owner_uid}, not to uid {f.euid} (the agent's)",
                f"chown {f.euid} {d.path}, or run the agent as its owner",
            )
        )
    elif not d.writable:
        findings.append(
            Finding("data dir", Level.FAIL, f"{d.path} is not writable", f"chmod u+w {d.path}")
        )
    elif d.mode is not None and d.mode & 0o077:
        findings.append(
            Finding(
                "data dir",
                Level.WARN,
                f"{d.path} is {oct(d.mode)}: group and others can look in",
                f"chmod 0700 {d.path} (the agent also does this at start)",
            )
        )
    else:
        findings.append(Finding("data dir", Level.OK, f"{d.path}, owner only"))
    findings.append(_check_space(d))
    return findings


def _check_space(d: DataDirFacts) -> Finding:
    if d.free_bytes is None:
        return Finding("disk space", Level.WARN, f"cannot tell the free space for {d.path}")
    free = format_size(d.free_bytes)
    if d.free_bytes < MIN_FREE_BYTES:
        return Finding(
            "disk space",
            Level.FAIL,
            f"{free} free for {d.path}",
            f"free at least {format_size(MIN_FREE_BYTES)} (snapshots and disks live there)",
        )
    if d.free_bytes < LOW_FREE_BYTES:
        return Finding(
            "disk space",
            Level.WARN,
            f"{free} free for {d.path}",
            "snapshots of large guests may not fit; free space or move data_dir",
        )
    return Finding("disk space", Level.OK, f"{free} free for {d.path}")


def check_clock(f: HostFacts) -> Finding:
    c = f.clock
    if c.synchronized is None:
        return Finding("clock", Level.WARN, f"cannot ask the kernel: {c.detail}")
    if not c.synchronized:
        return Finding(
            "clock",
            Level.WARN,
            "not synchronised (the kernel says its time is unsynchronised)",
            "run an NTP client (chrony, systemd-timesyncd): schedules and retention use this clock",
        )
    if c.max_error_us is not None and c.max_error_us > MAX_CLOCK_ERROR_US:
        return Finding(
            "clock",
            Level.WARN,
            f"synchronised, but the error bound is {c.max_error_us / 1000:.0f} ms",
            "check the NTP client's sources",
        )
    bound = f", error bound {c.max_error_us / 1000:.0f} ms" if c.max_error_us is not None else ""
    return Finding("clock", Level.OK, f"synchronised{bound}")


def examine(f: HostFacts) -> list[Finding]:
    """Every check, in the order an operator reads them."""
    findings = [check_qemu(f), check_kvm(f)]
    group = check_kvm_group(f)
    if group is not None:
        findings.append(group)
    findings.append(check_cgroups(f))
    findings += check_tools(f)
    findings.append(check_confinement(f))
    findings += check_data_dir(f)
    findings.append(check_clock(f))
    return findings


def exit_code(findings: list[Finding]) -> int:
    """Non-zero when something required is missing."""
    return 1 if any(x.level == Level.FAIL for x in findings) else 0
