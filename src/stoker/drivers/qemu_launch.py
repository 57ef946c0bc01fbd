"""From a VM spec and the services' launch decisions to a QEMU command with its descriptors.

The agent opens everything the VMM will use — the kernel, initrd and disks (only from image
pools, checked and opened without following links), the console log, the QMP socket, a TAP
queue, a state file to restore — and hands QEMU the descriptors; QEMU gets no path it could
be tricked into opening, and a confined QEMU could not open most of them anyway. The command
line itself is built from typed data by :mod:`stoker.drivers.qemu_argv`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from stoker.domain.spec import DriveFormat, NetworkMode, VMSpec
from stoker.drivers.base import BootOptions, DriverError, VMPaths
from stoker.drivers.qemu_argv import (
    Confinement,
    DiskImage,
    LaunchError,
    PortForward,
    QemuCommand,
    QemuLaunch,
    TapNetwork,
    UserNetwork,
    build_qemu_command,
)
from stoker.host.confine import (
    ConfinementError,
    check_readable_by,
    kvm_groups,
    listen_qmp,
    open_output,
    open_tap,
    prepare_runtime,
)
from stoker.host.images import (
    CheckedImage,
    ImagePolicy,
    ImageRejected,
    check_image,
    open_image,
)

ConfineMode = Literal["namespace", "runas"]
QCOW2_MAGIC = b"QFI\xfb"
#: a backing chain deeper than this is refused (qemu_argv's own limit)
MAX_BACKING_DEPTH = 16


@dataclass(frozen=True)
class LaunchSettings:
    """How this host launches QEMU: what every VM shares."""

    binary: str
    images: ImagePolicy
    #: None runs QEMU unconfined (``[security] confine = false``: development only)
    confine: ConfineMode | None = "namespace"
    user_net_outbound: bool = False


@dataclass
class PreparedLaunch:
    """The command, and the descriptors the agent opened for it (closed once spawned)."""

    command: QemuCommand
    fds: list[int] = field(default_factory=list)
    sockets: list[socket.socket] = field(default_factory=list)

    def close(self) -> None:
        """The child holds its own copies after the spawn: the agent's go."""
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        for sock in self.sockets:
            sock.close()
        self.fds.clear()
        self.sockets.clear()


def image_paths(spec: VMSpec) -> list[tuple[str, str]]:
    """(field, path) of every file a spec names."""
    named = [("kernel", spec.kernel)]
    if spec.initrd:
        named.append(("initrd", spec.initrd))
    named += [(f"drives[{i}].path", d.path) for i, d in enumerate(spec.drives)]
    return named


def check_images(settings: LaunchSettings, spec: VMSpec, private_dirs: Sequence[Path] = ()) -> None:
    """Raise ImageRejected (field, path, pools) for the first file the spec may not use;
    a qcow2 disk's backing chain must be acceptable too."""
    policies = _policies(settings, private_dirs)
    for name, path in image_paths(spec):
        _, checked = policies.check(name, path)
        if name.startswith("drives"):
            index = int(name[len("drives[") : name.index("]")])
            if spec.drives[index].format == DriveFormat.QCOW2:
                _backing_chain(policies, name, checked.real)


def prepare(
    settings: LaunchSettings,
    *,
    vm_id: str,
    spec: VMSpec,
    paths: VMPaths,
    boot: BootOptions,
    accel: str,
    cmdline: str,
    incoming: Path | None = None,
) -> PreparedLaunch:
    """Open every descriptor and build the command; on any failure nothing stays open."""
    prepared = PreparedLaunch(QemuCommand(()))
    try:
        prepared.command = _build(
            settings, prepared, vm_id, spec, paths, boot, accel, cmdline, incoming
        )
    except BaseException:
        prepared.close()
        raise
    return prepared


def _build(
    settings: LaunchSettings,
    opened: PreparedLaunch,
    vm_id: str,
    spec: VMSpec,
    paths: VMPaths,
    boot: BootOptions,
    accel: str,
    cmdline: str,
    incoming: Path | None,
) -> QemuCommand:
    policies = _policies(settings, boot.private_dirs)
    identity = boot.identity if settings.confine else None
    if settings.confine and identity is None:
        raise DriverError("confinement is on but the VM was given no uid to run as")
    uid, gid = (identity.uid, identity.gid) if identity else (0, 0)
    paths.root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def keep(fd: int) -> int:
        opened.fds.append(fd)
        return fd

    try:
        kernel_fd = keep(policies.open("kernel", spec.kernel, writable=False))
        initrd_fd = None
        if spec.initrd:
            initrd_fd = keep(policies.open("initrd", spec.initrd, writable=False))
        disks = tuple(
            _disk(policies, opened, f"drives[{i}].path", d.path, d.format, d.read_only)
            for i, d in enumerate(spec.drives)
        )
    except ImageRejected as exc:
        raise DriverError(str(exc)) from exc
    confinement = None
    if identity is not None and settings.confine is not None:
        runtime = prepare_runtime(paths.root / "run", uid, gid)
        groups: tuple[int, ...] = ()
        if settings.confine == "namespace":
            if accel == "kvm":
                groups = kvm_groups()
            for what, fd in (("the kernel", kernel_fd), ("the initrd", initrd_fd)):
                if fd is not None:
                    check_readable_by(fd, uid, (gid, *groups), what)
        confinement = Confinement(uid, gid, runtime.jail, settings.confine, groups)
    with contextlib.suppress(FileNotFoundError):
        paths.console.unlink()
    console_fd = keep(open_output(paths.console, uid, gid))
    qmp = listen_qmp(paths.control_socket)
    opened.sockets.append(qmp)
    agent = listen_qmp(paths.agent_socket)
    opened.sockets.append(agent)
    incoming_fd = None
    if incoming is not None:
        incoming_fd = keep(os.open(incoming, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC))
    launch = QemuLaunch(
        name=spec.name,
        instance=vm_id,
        accel="kvm" if accel == "kvm" else "tcg",
        memory_mib=spec.memory_mib,
        vcpus=spec.vcpus,
        kernel_fd=kernel_fd,
        cmdline=cmdline,
        qmp_fd=qmp.fileno(),
        console_fd=console_fd,
        initrd_fd=initrd_fd,
        disks=disks,
        network=_network(settings, opened, spec, boot),
        incoming_fd=incoming_fd,
        agent_fd=agent.fileno(),
        confinement=confinement,
        binary=settings.binary,
    )
    try:
        return build_qemu_command(launch)
    except LaunchError as exc:
        raise DriverError(f"refusing to launch QEMU: {exc}") from exc


@dataclass(frozen=True)
class _Policies:
    """The host's pools, and directories of the VM's own files (a snapshot's copies that a
    throwaway verification VM boots from) that only this launch may use."""

    host: ImagePolicy
    private: ImagePolicy | None

    def check(self, field_name: str, path: str) -> tuple[ImagePolicy, CheckedImage]:
        policy = self.host
        if self.private is not None:
            real = Path(os.path.realpath(path))
            if self.private.pool_of(real) is not None:
                policy = self.private
        return policy, check_image(policy, field_name, path)

    def open(self, field_name: str, path: str, *, writable: bool) -> int:
        policy, checked = self.check(field_name, path)
        return open_image(policy, checked, writable=writable)


def _policies(settings: LaunchSettings, private_dirs: Sequence[Path]) -> _Policies:
    private = ImagePolicy.create(private_dirs) if private_dirs else None
    return _Policies(settings.images, private)


def _disk(
    policies: _Policies,
    opened: PreparedLaunch,
    field_name: str,
    path: str,
    fmt: DriveFormat,
    read_only: bool,
) -> DiskImage:
    policy, checked = policies.check(field_name, path)
    fd = open_image(policy, checked, writable=not read_only)
    opened.fds.append(fd)
    backing = None
    if fmt == DriveFormat.QCOW2:
        # deepest first, so each image wraps the chain below it
        chain = _backing_chain(policies, field_name, checked.real)
        for link_policy, link, link_format in reversed(chain):
            link_fd = open_image(link_policy, link, writable=False)
            opened.fds.append(link_fd)
            backing = DiskImage(link_fd, link_format, read_only=True, backing=backing)
    return DiskImage(fd, "qcow2" if fmt == DriveFormat.QCOW2 else "raw", read_only, backing)


def _backing_chain(
    policies: _Policies, field_name: str, image: Path
) -> list[tuple[ImagePolicy, CheckedImage, Literal["raw", "qcow2"]]]:
    """The checked files of a qcow2 image's backing chain, nearest first, each with its
    format; every one must be acceptable under the same policy. QEMU is never left to follow
    the name in the header itself: an image could name any host file as its backing."""
    chain: list[tuple[ImagePolicy, CheckedImage, Literal["raw", "qcow2"]]] = []
    current = image
    for _ in range(MAX_BACKING_DEPTH):
        name = qcow2_backing_name(current)
        if name is None:
            return chain
        target = name if name.startswith("/") else str(current.parent / name)
        policy, checked = policies.check(f"{field_name} (backing file)", target)
        fmt: Literal["raw", "qcow2"] = "qcow2" if _is_qcow2(checked.real) else "raw"
        chain.append((policy, checked, fmt))
        if fmt == "raw":
            return chain
        current = checked.real
    raise ImageRejected(field_name, str(image), policies.host.pools, "has too deep a backing chain")


def _is_qcow2(path: Path) -> bool:
    with open(path, "rb") as image:
        return image.read(4) == QCOW2_MAGIC


def qcow2_backing_name(path: Path) -> str | None:
    """The backing file name in a qcow2 header, or None (not qcow2, or no backing file)."""
    with open(path, "rb") as image:
        header = image.read(20)
        if len(header) < 20 or header[:4] != QCOW2_MAGIC:
            return None
        offset, size = struct.unpack(">QI", header[8:20])
        if offset == 0 or size == 0:
            return None
        if size > 1023:
            raise ValueError(f"{path}: a backing file name of {size} bytes is not plausible")
        image.seek(offset)
        return image.read(size).decode("utf-8", errors="strict")


def _network(
    settings: LaunchSettings, opened: PreparedLaunch, spec: VMSpec, boot: BootOptions
) -> UserNetwork | TapNetwork | None:
    net = spec.network
    try:
        if net.mode == NetworkMode.USER:
            forwards = tuple(
                PortForward(pf.host_port, pf.guest_port, pf.host_addr, pf.protocol)
                for pf in net.port_forwards
            )
            return UserNetwork(forwards, net.mac, restrict=not settings.user_net_outbound)
        if net.mode == NetworkMode.TAP and net.tap:
            fd = open_tap(net.tap)
            opened.fds.append(fd)
            return TapNetwork(fd, net.mac)
        if net.mode == NetworkMode.MANAGED:
            if boot.network is None:
                raise DriverError("network mode 'managed' but no NIC was attached to the VM")
            fd = open_tap(boot.network.tap)
            opened.fds.append(fd)
            return TapNetwork(fd, boot.network.mac)
    except ConfinementError as exc:
        raise DriverError(str(exc)) from exc
    return None
