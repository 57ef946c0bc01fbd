"""QEMU's command line built from typed data, so no value can add an option.

QEMU's classic option syntax (``key=value,key=value``) gives a comma in a value the power to
start a new option: a drive path ending in ``,cache=unsafe`` or a forward address of
``0.0.0.0,tftp=/`` becomes configuration. Here nothing from a request is ever placed in that
syntax:

- backends and devices use QEMU's JSON syntax (``-blockdev``, ``-netdev``, ``-device``, all
  accepted by QEMU 7.2; ``-chardev`` is not, so its options hold only numbers and fixed words);
- files are open descriptors, never paths: disks and the console through ``-add-fd`` and
  ``/dev/fdset/N``, the kernel and initrd through ``/proc/self/fd/N`` (read before QEMU drops
  privileges) or a read-only bind in the namespace jail, the QMP socket as a listening
  descriptor, a TAP as its queue descriptor, restored state as ``-incoming fd:N``;
- the strings that remain are validated by type: the VM name by the spec's pattern, a MAC as
  a unicast address, a forward's host address as an IPv4 address, ports and sizes as ints.
  The kernel command line is one argv element that QEMU never parses.

The caller opens every descriptor (``stoker.host.images``, ``stoker.host.confine``) and
passes :attr:`QemuCommand.pass_fds` to the spawn; fd numbers stay the same in the child.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from stoker.host.confine import JailFile, namespace_jail_argv

Accel = Literal["tcg", "kvm"]
DiskFormat = Literal["raw", "qcow2"]
ConfineMode = Literal["namespace", "runas"]

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
INSTANCE_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
SANDBOX = "on,obsolete=deny,spawn=deny,resourcecontrol=deny"
MAX_MEMORY_MIB = 4 * 1024 * 1024
MAX_BACKING_DEPTH = 16
#: the virtio-serial port name QEMU's guest agent (qemu-ga) listens on
GUEST_AGENT_PORT = "org.qemu.guest_agent.0"
#: where the namespace jail shows the kernel and initrd
JAIL_KERNEL = "/kernel"
JAIL_INITRD = "/initrd"


class LaunchError(ValueError):
    """A launch description QEMU must not be given; ``field`` names the part to fix."""

    def __init__(self, field_name: str, message: str) -> None:
        self.field = field_name
        super().__init__(f"{field_name}: {message}")


@dataclass(frozen=True)
class DiskImage:
    """One open image file. A qcow2 image's backing chain is given here, by descriptor, or
    not at all: the backing file name inside the image is never followed (an image could
    otherwise name any host file as its backing)."""

    fd: int
    format: DiskFormat = "raw"
    read_only: bool = False
    backing: DiskImage | None = None


@dataclass(frozen=True)
class PortForward:
    """A user-mode network forward from ``host_addr:host_port`` to the guest's port."""

    host_port: int
    guest_port: int
    host_addr: str = "127.0.0.1"
    protocol: Literal["tcp", "udp"] = "tcp"


@dataclass(frozen=True)
class UserNetwork:
    """QEMU's user-mode network. Its outbound connections are made by the QEMU process, so
    by default a guest reaches the host's loopback services (10.0.2.2 is the host's
    127.0.0.1); ``restrict`` cuts the guest off from the host and the outside, leaving only
    the forwards."""

    forwards: tuple[PortForward, ...] = ()
    mac: str | None = None
    restrict: bool = False


@dataclass(frozen=True)
class TapNetwork:
    """A TAP the agent attached to (``stoker.host.confine.open_tap``): QEMU gets its fd."""

    fd: int
    mac: str | None = None


@dataclass(frozen=True)
class Confinement:
    """Who QEMU runs as and where its root is.

    ``namespace``: exec'd unprivileged in a mount-namespace jail at ``jail`` (the agent must
    be root), ``-sandbox`` with ``elevateprivileges=deny``. ``runas``: QEMU drops to
    ``uid``/``gid`` and chroots into ``jail`` (an empty directory) itself. ``groups`` are
    supplementary groups for ``namespace`` (the /dev/kvm group for accel kvm).
    """

    uid: int
    gid: int
    jail: Path
    mode: ConfineMode = "namespace"
    groups: tuple[int, ...] = ()


@dataclass(frozen=True)
class QemuLaunch:
    """Everything one QEMU launch needs; the driver maps a VM spec onto it."""

    name: str
    #: the VM's id: shown in the process's command line so a VMM can be found by it
    instance: str
    accel: Accel
    memory_mib: int
    vcpus: int
    kernel_fd: int
    cmdline: str
    qmp_fd: int  # a listening Unix socket
    console_fd: int  # the serial console's log, open for writing
    initrd_fd: int | None = None
    disks: tuple[DiskImage, ...] = ()
    network: UserNetwork | TapNetwork | None = None
    incoming_fd: int | None = None  # restore: migration stream to read
    #: a listening Unix socket for the guest agent channel (virtio-serial port
    #: ``org.qemu.guest_agent.0``): how the host tells a restored guest the time
    agent_fd: int | None = None
    confinement: Confinement | None = None
    binary: str = "qemu-system-x86_64"
    sandbox: bool = True  # QEMU's seccomp filter; on whenever confinement is


@dataclass(frozen=True)
class QemuCommand:
    """What to spawn: ``argv`` with ``pass_fds`` inherited under the same numbers."""

    argv: tuple[str, ...]
    pass_fds: tuple[int, ...] = ()


# ----------------------------------------------------------------------------- validation


def process_tag(instance: str) -> str:
    """What a VMM's command line carries to be found again (an orphan after an agent crash,
    a test's leftovers): ``process=stoker-<vm id>`` in its ``-name``."""
    return f"stoker-{instance}"


def valid_mac(mac: str, field_name: str = "network.mac") -> str:
    """A unicast MAC address (``52:54:00:12:34:56``); returned lower-case."""
    low = mac.lower()
    if not MAC_RE.fullmatch(low):
        raise LaunchError(field_name, f"{mac!r} is not a MAC address like 52:54:00:12:34:56")
    first = int(low[:2], 16)
    if first & 1:
        raise LaunchError(
            field_name, f"{mac!r} is a multicast address; the first byte must be even"
        )
    if low == "00:00:00:00:00:00":
        raise LaunchError(field_name, "00:00:00:00:00:00 is not a usable address")
    return low


def valid_host_addr(addr: str, field_name: str = "host_addr") -> str:
    """An IPv4 address in dotted form (QEMU 7.2 forwards only IPv4 host addresses)."""
    try:
        parsed = ipaddress.IPv4Address(addr)
    except ValueError:
        raise LaunchError(field_name, f"{addr!r} is not an IPv4 address like 127.0.0.1") from None
    if str(parsed) != addr:
        raise LaunchError(field_name, f"{addr!r} must be written as {parsed}")
    return addr


def _int(value: object, field_name: str, low: int, high: int) -> int:
    # bool is an int subclass; a JSON true must not become 1
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise LaunchError(field_name, f"must be a whole number from {low} to {high}, not {value!r}")
    return value


def _fd(value: object, field_name: str) -> int:
    # QEMU refuses stdin/stdout/stderr as handed-over descriptors
    return _int(value, field_name, 3, 2**31 - 1)


def _check(launch: QemuLaunch) -> None:
    if not isinstance(launch.name, str) or not NAME_RE.fullmatch(launch.name):
        raise LaunchError("name", f"{launch.name!r} must match {NAME_RE.pattern}")
    if not isinstance(launch.instance, str) or not INSTANCE_RE.fullmatch(launch.instance):
        raise LaunchError("instance", f"{launch.instance!r} must match {INSTANCE_RE.pattern}")
    if launch.accel not in ("tcg", "kvm"):
        raise LaunchError("accel", f"must be 'tcg' or 'kvm', not {launch.accel!r}")
    _int(launch.memory_mib, "memory_mib", 16, MAX_MEMORY_MIB)
    _int(launch.vcpus, "vcpus", 1, 255)
    if not isinstance(launch.cmdline, str) or any(c in launch.cmdline for c in "\x00\n\r"):
        raise LaunchError("cmdline", "must be a single line without NUL bytes")
    if not launch.binary or launch.binary.startswith("-") or "\x00" in launch.binary:
        raise LaunchError("binary", f"{launch.binary!r} is not a program name or path")
    _check_network(launch.network)
    for i, disk in enumerate(launch.disks):
        _check_disk(disk, i)
    _check_fds(launch)
    _check_confinement(launch)


def _check_network(net: UserNetwork | TapNetwork | None) -> None:
    if isinstance(net, UserNetwork):
        seen = set()
        for i, pf in enumerate(net.forwards):
            where = f"network.port_forwards.{i}"
            _int(pf.host_port, f"{where}.host_port", 1, 65535)
            _int(pf.guest_port, f"{where}.guest_port", 1, 65535)
            valid_host_addr(pf.host_addr, f"{where}.host_addr")
            if pf.protocol not in ("tcp", "udp"):
                raise LaunchError(
                    f"{where}.protocol", f"must be 'tcp' or 'udp', not {pf.protocol!r}"
                )
            key = (pf.protocol, pf.host_addr, pf.host_port)
            if key in seen:
                raise LaunchError(f"{where}.host_port", f"{pf.host_port} is forwarded twice")
            seen.add(key)
        if not isinstance(net.restrict, bool):
            raise LaunchError("network.restrict", "must be true or false")
    elif net is not None and not isinstance(net, TapNetwork):
        raise LaunchError("network", f"unknown network {net!r}")
    if net is not None and net.mac is not None:
        valid_mac(net.mac)


def _check_disk(disk: DiskImage, index: int) -> None:
    image: DiskImage | None = disk
    depth = 0
    while image is not None:
        if image.format not in ("raw", "qcow2"):
            raise LaunchError(
                f"disks.{index}.format", f"must be raw or qcow2, not {image.format!r}"
            )
        if image.backing is not None and image.format != "qcow2":
            raise LaunchError(f"disks.{index}.backing", "only a qcow2 image has a backing file")
        depth += 1
        if depth > MAX_BACKING_DEPTH:
            raise LaunchError(f"disks.{index}.backing", f"more than {MAX_BACKING_DEPTH} levels")
        image = image.backing


def _check_fds(launch: QemuLaunch) -> None:
    named = _named_fds(launch)
    for name, fd in named:
        _fd(fd, name)
    fds = [fd for _, fd in named]
    if len(set(fds)) != len(fds):
        raise LaunchError("fds", f"each descriptor may serve one purpose only: {fds}")


def _check_confinement(launch: QemuLaunch) -> None:
    c = launch.confinement
    if c is None:
        return
    _int(c.uid, "confinement.uid", 1, 2**32 - 2)
    _int(c.gid, "confinement.gid", 1, 2**32 - 2)
    for g in c.groups:
        _int(g, "confinement.groups", 1, 2**32 - 2)
    if c.mode not in ("namespace", "runas"):
        raise LaunchError("confinement.mode", f"must be namespace or runas, not {c.mode!r}")
    jail = str(c.jail)
    if not jail.startswith("/") or any(ch in jail for ch in ",\x00\n"):
        raise LaunchError("confinement.jail", f"{jail!r} must be an absolute path, no commas")
    if not launch.sandbox:
        raise LaunchError("sandbox", "a confined QEMU always runs under its seccomp sandbox")


def _named_fds(launch: QemuLaunch) -> list[tuple[str, int]]:
    named = [("kernel_fd", launch.kernel_fd), ("qmp_fd", launch.qmp_fd)]
    named.append(("console_fd", launch.console_fd))
    if launch.initrd_fd is not None:
        named.append(("initrd_fd", launch.initrd_fd))
    for i, disk in enumerate(launch.disks):
        image: DiskImage | None = disk
        while image is not None:
            named.append((f"disks.{i}.fd", image.fd))
            image = image.backing
    if isinstance(launch.network, TapNetwork):
        named.append(("network.fd", launch.network.fd))
    if launch.incoming_fd is not None:
        named.append(("incoming_fd", launch.incoming_fd))
    if launch.agent_fd is not None:
        named.append(("agent_fd", launch.agent_fd))
    return named


# ----------------------------------------------------------------------------- building


def _json(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True)


class _FdSets:
    """``-add-fd`` arguments: one fd set per descriptor, numbered from 1."""

    def __init__(self) -> None:
        self.argv: list[str] = []
        self._next = 1

    def add(self, fd: int) -> str:
        number = self._next
        self._next += 1
        self.argv += ["-add-fd", f"fd={fd},set={number}"]
        return f"/dev/fdset/{number}"

    def take(self) -> list[str]:
        """The ``-add-fd`` arguments added since the last call."""
        taken, self.argv = self.argv, []
        return taken


def _blockdev(image: DiskImage, node: str, sets: _FdSets, read_only: bool) -> dict[str, Any]:
    ro = read_only or image.read_only
    spec: dict[str, Any] = {
        "driver": image.format,
        "node-name": node,
        "read-only": ro,
        "file": {"driver": "file", "filename": sets.add(image.fd), "read-only": ro},
    }
    if image.format == "qcow2":
        spec["backing"] = (
            None
            if image.backing is None
            else _blockdev(image.backing, f"{node}-b", sets, read_only=True)
        )
    return spec


def build_qemu_command(launch: QemuLaunch) -> QemuCommand:
    """The argv and the descriptors to pass; raises LaunchError for anything unsafe."""
    _check(launch)
    conf = launch.confinement
    in_jail = conf is not None and conf.mode == "namespace"
    kernel = JAIL_KERNEL if in_jail else f"/proc/self/fd/{launch.kernel_fd}"
    argv = [
        launch.binary,
        "-name", f"guest=stoker-{launch.name},process={process_tag(launch.instance)}",
        "-M", "microvm",
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-display", "none",
        "-accel", launch.accel,
        "-m", str(launch.memory_mib),
        "-smp", str(launch.vcpus),
        "-kernel", kernel,
        "-append", launch.cmdline,
    ]  # fmt: skip
    if launch.accel == "kvm":
        argv += ["-cpu", "host"]
    if launch.initrd_fd is not None:
        argv += ["-initrd", JAIL_INITRD if in_jail else f"/proc/self/fd/{launch.initrd_fd}"]
    argv += [
        "-chardev", f"socket,id=qmp,fd={launch.qmp_fd},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
    ]  # fmt: skip
    sets = _FdSets()
    console = sets.add(launch.console_fd)
    argv += sets.take()
    argv += ["-chardev", f"file,id=con0,path={console},append=on", "-serial", "chardev:con0"]
    for i, disk in enumerate(launch.disks):
        node = _blockdev(disk, f"vd{i}", sets, read_only=False)
        argv += sets.take()
        argv += ["-blockdev", _json(node)]
        argv += [
            "-device",
            _json({"driver": "virtio-blk-device", "drive": f"vd{i}", "id": f"vd{i}"}),
        ]
    argv += _network_args(launch.network)
    if launch.agent_fd is not None:
        argv += [
            "-chardev", f"socket,id=ga,fd={launch.agent_fd},server=on,wait=off",
            "-device", _json({"driver": "virtio-serial-device", "id": "vser0"}),
            "-device", _json({
                "driver": "virtserialport",
                "bus": "vser0.0",
                "chardev": "ga",
                "name": GUEST_AGENT_PORT,
            }),
        ]  # fmt: skip
    if launch.incoming_fd is not None:
        argv += ["-incoming", f"fd:{launch.incoming_fd}"]
    if launch.sandbox or conf is not None:
        argv += ["-sandbox", SANDBOX + (",elevateprivileges=deny" if in_jail else "")]
    if conf is not None and conf.mode == "runas":
        argv += ["-runas", f"{conf.uid}:{conf.gid}", "-chroot", str(conf.jail)]
    if conf is not None and in_jail:
        argv = [*_jail_prefix(launch, conf), *argv]
    return QemuCommand(argv=tuple(argv), pass_fds=tuple(fd for _, fd in _named_fds(launch)))


def _jail_prefix(launch: QemuLaunch, conf: Confinement) -> list[str]:
    """The namespace jail around QEMU: what it shows, then who QEMU runs as."""
    # QEMU opens /dev/null to probe for OFD locks; without it image locks are weaker
    files = [
        JailFile("/dev/null", "dev/null", device=True),
        JailFile(f"/proc/self/fd/{launch.kernel_fd}", JAIL_KERNEL[1:]),
    ]
    if launch.initrd_fd is not None:
        files.append(JailFile(f"/proc/self/fd/{launch.initrd_fd}", JAIL_INITRD[1:]))
    if launch.accel == "kvm":
        files.append(JailFile("/dev/kvm", "dev/kvm", device=True))
    return namespace_jail_argv(conf.jail, conf.uid, conf.gid, conf.groups, files)


def _network_args(net: UserNetwork | TapNetwork | None) -> list[str]:
    if net is None:
        return []
    if isinstance(net, UserNetwork):
        backend: dict[str, Any] = {"type": "user", "id": "n0"}
        if net.restrict:
            backend["restrict"] = True
        if net.forwards:
            backend["hostfwd"] = [
                {"str": f"{pf.protocol}:{pf.host_addr}:{pf.host_port}-:{pf.guest_port}"}
                for pf in net.forwards
            ]
    else:
        backend = {"type": "tap", "id": "n0", "fd": str(net.fd)}
    device: dict[str, Any] = {"driver": "virtio-net-device", "netdev": "n0", "id": "net0"}
    if net.mac is not None:
        device["mac"] = net.mac.lower()
    return ["-netdev", _json(backend), "-device", _json(device)]
