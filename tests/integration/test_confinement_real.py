"""Real QEMU test guests launched confined, straight from the argv builder (no agent).

Each scenario boots once: a namespace-confined guest (the preferred mode) with a data disk
and a port forward that is then saved through a descriptor and restored from one; a
``-runas``/``-chroot`` guest on a TAP inside a network namespace the test creates. Both are
checked from /proc: the VM's own uid, no capabilities, ``Seccomp: 2``, a root that is not
the host's, and an environment without any agent variable.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from stoker.drivers.qemu_argv import (
    SANDBOX,
    Confinement,
    DiskImage,
    PortForward,
    QemuLaunch,
    TapNetwork,
    UserNetwork,
    build_qemu_command,
)
from stoker.host import confine, images
from stoker.host.proc import spawn_detached
from stoker.host.tsc import host_tsc_khz
from tests.helpers import free_port, guest_image, http_get, short_tmpdir, wait_for

needs_mke2fs = pytest.mark.skipif(
    shutil.which("mke2fs") is None, reason="needs mke2fs (e2fsprogs) to format the data disk"
)
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: per-VM uids, mounts, netns"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU"),
]

VM_UID = 200411
OTHER_UID = 200412
#: what the namespace jail holds: /usr read-only, links to it, the kernel, initrd, /dev/null
NAMESPACE_ROOT = {"bin", "dev", "etc", "initrd", "kernel", "lib", "lib64", "sbin", "usr"}


@dataclass
class Guest:
    """One confined QEMU and what the test needs to reach and check it."""

    proc: subprocess.Popen[bytes]
    runtime: confine.VMRuntime
    argv: tuple[str, ...]
    port: int | None = None
    fds: list[int] = field(default_factory=list)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = short_tmpdir("stkc-")
    os.chmod(path, 0o711)  # the VM uids must be able to walk to their own runtime dirs
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def guests() -> Iterator[list[Guest]]:
    started: list[Guest] = []
    try:
        yield started
    finally:
        for guest in started:
            guest.kill()


def cmdline() -> str:
    image = guest_image()
    khz = host_tsc_khz()
    return f"{image.cmdline} tsc_early_khz={khz}" if khz else image.cmdline


def launch_guest(
    started: list[Guest],
    runtime: confine.VMRuntime,
    policy: images.ImagePolicy,
    conf: Confinement,
    *,
    network: UserNetwork | TapNetwork,
    disks: tuple[tuple[str, str, bool], ...] = (),
    incoming: Path | None = None,
) -> Guest:
    """Open everything the VM needs as the agent would, build the argv and spawn QEMU."""
    image = guest_image()
    fds: list[int] = []
    try:
        kernel = images.open_pool_image(policy, "kernel", str(image.kernel), writable=False)
        fds.append(kernel)
        initrd = images.open_pool_image(policy, "initrd", str(image.initrd), writable=False)
        fds.append(initrd)
        chain: DiskImage | None = None
        for i, (path, fmt, writable) in enumerate(reversed(disks)):
            fd = images.open_pool_image(policy, f"drives.{i}.path", path, writable=writable)
            fds.append(fd)
            chain = DiskImage(fd, fmt, read_only=not writable, backing=chain)  # type: ignore[arg-type]
        qmp = confine.listen_qmp(runtime.qmp_socket)
        console = confine.open_output(runtime.console, runtime.uid, runtime.gid)
        fds.append(console)
        os.close(confine.open_output(runtime.vmm_log, runtime.uid, runtime.gid))
        if incoming is not None:
            fds.append(os.open(incoming, os.O_RDONLY | os.O_CLOEXEC))
        launch = QemuLaunch(
            name="confined",
            instance=uuid.uuid4().hex[:16],
            accel="tcg",
            memory_mib=128,
            vcpus=1,
            kernel_fd=kernel,
            initrd_fd=initrd,
            cmdline=cmdline(),
            qmp_fd=qmp.fileno(),
            console_fd=console,
            disks=(chain,) if chain is not None else (),
            network=network,
            incoming_fd=fds[-1] if incoming is not None else None,
            confinement=conf,
        )
        command = build_qemu_command(launch)
        env = {**confine.minimal_env()}
        proc = spawn_detached(
            command.argv, runtime.vmm_log, env=env, pass_fds=command.pass_fds, cwd=Path("/")
        )
        qmp.close()  # QEMU holds its own copy now
    finally:
        images.close_all(fds)
    port = network.forwards[0].host_port if isinstance(network, UserNetwork) else None
    guest = Guest(proc, runtime, command.argv, port)
    started.append(guest)
    return guest


@contextlib.asynccontextmanager
async def qmp_of(guest: Guest) -> AsyncIterator[QMPClient]:
    client = QMPClient("confinement-test")
    await client.connect(str(guest.runtime.qmp_socket))
    try:
        yield client
    finally:
        await client.disconnect()


async def ask(qmp: QMPClient, command: str) -> dict[str, Any]:
    answer = await qmp.execute(command)
    assert isinstance(answer, dict)
    return answer


async def wait_http(guest: Guest, path: str = "/health", timeout: float = 30.0) -> str:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        answer = await asyncio.to_thread(http_get, f"http://127.0.0.1:{guest.port}{path}")
        if answer is not None and answer[0] == 200:
            return answer[1]
        if guest.proc.poll() is not None:
            raise AssertionError(f"QEMU exited: {guest.runtime.vmm_log.read_text()}")
        if loop.time() > deadline:
            raise AssertionError(f"no answer on {path}: {guest.runtime.console.read_text()}")
        await asyncio.sleep(0.02)


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if item)


def make_disks(pool: Path) -> tuple[Path, Path]:
    """A raw ext2 base (formatted here: mkfs inside a TCG guest costs seconds) under a qcow2
    overlay the guest writes to."""
    base = pool / "base.raw"
    overlay = pool / "data.qcow2"
    subprocess.run(["truncate", "-s", "16M", str(base)], check=True)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext2", str(base)], check=True)
    create = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base)]
    subprocess.run([*create, str(overlay)], check=True)
    return base, overlay


@needs_mke2fs
async def test_namespace_confined_guest_boots_saves_and_restores(
    workdir: Path, guests: list[Guest], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STOKER_API__TOKEN", "must-not-reach-the-vmm")
    pool = workdir / "pool"
    pool.mkdir()
    base, overlay = make_disks(pool)
    policy = images.ImagePolicy.create(
        [pool, guest_image().kernel.parent], images.agent_private_paths(workdir / "data")
    )
    runtime = confine.prepare_runtime(workdir / "vm1", VM_UID, VM_UID)
    conf = Confinement(VM_UID, VM_UID, runtime.jail, mode="namespace")
    network = UserNetwork((PortForward(free_port(), 80),), mac="52:54:00:12:34:56")
    disks = ((str(overlay), "qcow2", True), (str(base), "raw", False))
    guest = launch_guest(guests, runtime, policy, conf, network=network, disks=disks)
    assert "ok" in await wait_http(guest)

    info = confine.check_confined(guest.proc.pid, VM_UID, VM_UID)
    assert info.cap_bnd == 0 and info.groups == () and not info.mount_ns_is_host
    assert set(os.listdir(f"/proc/{guest.proc.pid}/root")) == NAMESPACE_ROOT
    assert environ_of(guest.proc.pid) == confine.minimal_env()
    assert "elevateprivileges=deny" in guest.argv[-1]
    # nothing the namespace mounted shows on the host
    assert not os.listdir(runtime.jail)
    assert await asyncio.to_thread(
        http_get, f"http://127.0.0.1:{guest.port}/cgi-bin/write-marker?value=kept", 5.0
    ) == (200, "data\n")

    state = workdir / "vm1.state"
    async with qmp_of(guest) as qmp:
        assert (await ask(qmp, "query-status"))["status"] == "running"
        await qmp.execute("stop")
        await qmp.execute("migrate-set-parameters", {"max-bandwidth": 64 * 2**30})
        fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            qmp.send_fd_scm(fd)
            await qmp.execute("getfd", {"fdname": "state"})
        finally:
            os.close(fd)
        await qmp.execute("migrate", {"uri": "fd:state"})
        while (status := (await ask(qmp, "query-migrate"))["status"]) not in (
            "completed",
            "failed",
        ):
            await asyncio.sleep(0.01)
        assert status == "completed"
    guest.kill()
    assert state.stat().st_size > 10 * 2**20

    restored = launch_guest(
        guests, runtime, policy, conf, network=network, disks=disks, incoming=state
    )
    async with qmp_of(restored) as qmp:
        while (await ask(qmp, "query-status"))["status"] != "paused":
            assert restored.proc.poll() is None, restored.runtime.vmm_log.read_text()
            await asyncio.sleep(0.01)
        await qmp.execute("cont")
    assert await wait_http(restored, "/cgi-bin/read-marker?where=tmp") == "kept"
    assert await wait_http(restored, "/cgi-bin/read-marker") == "kept"  # from the data disk
    confine.check_confined(restored.proc.pid, VM_UID, VM_UID)


@pytest.fixture
def netns() -> Iterator[str]:
    name = "stkc-" + uuid.uuid4().hex[:8]
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def tap_with_dhcp(netns: str, workdir: Path) -> Iterator[tuple[str, str]]:
    """A TAP at 10.0.2.2/24 in the test's namespace, and dnsmasq there leasing 10.0.2.15
    (the test guest takes its address by DHCP)."""
    if shutil.which("dnsmasq") is None:
        pytest.skip("needs dnsmasq (apt-get install dnsmasq-base) to give the guest an address")
    tap = "stkc-tap0"
    for step in (
        ["tuntap", "add", "dev", tap, "mode", "tap"],
        ["addr", "add", "10.0.2.2/24", "dev", tap],
        ["link", "set", tap, "up"],
    ):
        subprocess.run(["ip", "-n", netns, *step], check=True)
    leases, pidfile = workdir / "leases", workdir / "dnsmasq.pid"
    options = [
        "--keep-in-foreground", "--conf-file=/dev/null", "--port=0", "--no-resolv", "--no-ping",
        "--bind-interfaces", f"--interface={tap}", "--dhcp-authoritative",
        "--dhcp-range=10.0.2.15,10.0.2.15,255.255.255.0,1h",
        f"--dhcp-leasefile={leases}", f"--pid-file={pidfile}",
    ]  # fmt: skip
    dnsmasq = subprocess.Popen(
        ["ip", "netns", "exec", netns, "dnsmasq", *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield netns, tap
    finally:
        dnsmasq.kill()
        dnsmasq.wait(10)


async def test_runas_confined_guest_on_a_tap_by_descriptor(
    workdir: Path, guests: list[Guest], tap_with_dhcp: tuple[str, str]
) -> None:
    netns, tap = tap_with_dhcp
    policy = images.ImagePolicy.create([guest_image().kernel.parent])
    runtime = confine.prepare_runtime(workdir / "vm2", VM_UID, VM_UID)
    conf = Confinement(VM_UID, VM_UID, runtime.jail, mode="runas")
    tap_fd = confine.open_tap(tap, netns)
    try:
        guest = launch_guest(
            guests, runtime, policy, conf, network=TapNetwork(tap_fd, "52:54:00:00:00:02")
        )
    finally:
        os.close(tap_fd)

    def http_over_tap() -> bool:
        curl = ["ip", "netns", "exec", netns, "curl", "-s", "-m", "0.3", "http://10.0.2.15/health"]
        assert guest.proc.poll() is None, runtime.vmm_log.read_text()
        return subprocess.run(curl, capture_output=True, check=False).stdout == b"ok\n"

    await asyncio.to_thread(wait_for, http_over_tap, 30.0)
    info = confine.check_confined(guest.proc.pid, VM_UID, VM_UID)
    assert info.groups == (VM_UID,) and info.mount_ns_is_host
    assert os.listdir(f"/proc/{guest.proc.pid}/root") == []  # the empty jail
    assert os.readlink(f"/proc/{guest.proc.pid}/root") == str(runtime.jail)
    assert list(guest.argv[-5:]) == [
        SANDBOX, "-runas", f"{VM_UID}:{VM_UID}", "-chroot", str(runtime.jail),
    ]  # fmt: skip


def test_runas_cannot_also_deny_elevating_privileges(workdir: Path) -> None:
    """Why ``runas`` mode has no ``elevateprivileges=deny``: QEMU 7.2 calls setuid after
    loading its filter and the kernel kills it (FACTS.md). A newer QEMU that fixes this
    fails here, and runas mode can then turn the option on."""
    jail = confine.prepare_runtime(workdir / "vm3", VM_UID, VM_UID).jail
    argv = [
        "qemu-system-x86_64", "-M", "none", "-display", "none", "-nodefaults",
        "-sandbox", SANDBOX + ",elevateprivileges=deny",
        "-runas", f"{VM_UID}:{VM_UID}", "-chroot", str(jail),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, timeout=30, env=confine.minimal_env())
    assert done.returncode == -signal.SIGSYS


def test_a_vm_uid_cannot_open_another_vms_files(workdir: Path) -> None:
    mine = confine.prepare_runtime(workdir / "mine", VM_UID, VM_UID)
    theirs = confine.prepare_runtime(workdir / "theirs", OTHER_UID, OTHER_UID)
    their_disk = theirs.dir / "disk.img"
    their_disk.write_bytes(b"their data")
    os.chown(their_disk, OTHER_UID, OTHER_UID)
    os.chmod(their_disk, 0o600)
    # even with the directory open to all, the 0600 file itself refuses another uid
    loose = workdir / "loose.img"
    loose.write_bytes(b"their data")
    os.chown(loose, OTHER_UID, OTHER_UID)
    os.chmod(loose, 0o600)
    my_log = confine.open_output(mine.console, VM_UID, VM_UID)
    os.close(my_log)

    assert confine.try_open_as(mine.console, VM_UID, VM_UID, os.O_WRONLY) == 0
    assert confine.try_open_as(their_disk, VM_UID, VM_UID) == errno.EACCES
    assert confine.try_open_as(their_disk, VM_UID, VM_UID, os.O_RDWR) == errno.EACCES
    assert confine.try_open_as(loose, VM_UID, VM_UID, os.O_RDWR) == errno.EACCES
    assert confine.try_open_as(theirs.dir, VM_UID, VM_UID) == errno.EACCES
    assert confine.try_open_as(loose, OTHER_UID, OTHER_UID, os.O_RDWR) == 0
