"""Every VMM confined, proved on real guests started by a real agent.

A started QEMU runs as its VM's own uid with no capabilities under a seccomp filter, in a
mount namespace whose root is not the host's; as that uid it cannot open another VM's
files; a symlink swapped into a pool between create and start is never followed; and no
agent variable (the API token above all) reaches its environment.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from stoker.client import StokerError
from stoker.host.confine import read_confinement, try_open_as
from tests.helpers import AgentProcess, guest_spec


@pytest.fixture
def agent(guest: object) -> Iterator[AgentProcess]:
    token = "s3cret-" + "x" * 40
    proc = AgentProcess(env={"STOKER_API__TOKEN": token, "STOKER_SECRET_PROBE": "leak"})
    proc.start()
    try:
        yield proc
    finally:
        proc.cleanup()


def disk_in_pool(agent: AgentProcess, name: str) -> Path:
    disk = agent.images / f"{name}.img"
    disk.write_bytes(bytes(4 << 20))
    os.chmod(disk, 0o600)
    return disk


def test_each_vmm_runs_as_its_own_uid_jailed_and_sandboxed(agent: AgentProcess) -> None:
    with agent.client() as api:
        for name in ("a", "b"):
            spec = guest_spec(name, drives=[{"path": str(disk_in_pool(agent, name))}])
            api.create_vm(spec)
            assert api.start_vm(name).state == "running"
        a, b = api.get_vm("a"), api.get_vm("b")
        assert a.process is not None and b.process is not None
        info_a, info_b = read_confinement(a.process.pid), read_confinement(b.process.pid)
        for info in (info_a, info_b):
            uid = info.uids[0]
            assert uid >= 200000 and set(info.uids) == {uid} and set(info.gids) == {uid}
            assert info.cap_eff == 0 and info.cap_prm == 0 and info.cap_bnd == 0
            assert info.seccomp == 2 and info.no_new_privs
            assert not info.root_is_host and not info.mount_ns_is_host
        uid_a, uid_b = info_a.uids[0], info_b.uids[0]
        assert uid_a != uid_b, "two VMs never share a uid"

        # as VM a's uid: nothing of VM b's can be opened, nor the agent's own files
        b_dir = agent.data_dir / "vms" / b.id
        for target in (
            b_dir / "console.log",
            b_dir / "vmm.log",
            agent.images / "b.img",
            agent.data_dir / "stoker.db",
        ):
            assert try_open_as(target, uid_a, uid_a) in (errno.EACCES, errno.EPERM), target
        assert try_open_as(agent.images / "b.img", uid_a, uid_a, os.O_RDWR) != 0

        # its root holds nothing of the host's: no data dir, no /etc
        root = Path(f"/proc/{a.process.pid}/root")
        assert not (root / "etc" / "shadow").exists()
        assert not (root / str(agent.data_dir).lstrip("/")).exists()

        # no agent variable, no token in its environment
        env = Path(f"/proc/{a.process.pid}/environ").read_bytes().split(b"\0")
        assert not any(e.startswith(b"STOKER_") for e in env), env
        assert not any(b"s3cret" in e for e in env)


def test_a_symlink_swapped_in_after_create_is_not_followed(agent: AgentProcess) -> None:
    disk = disk_in_pool(agent, "swap")
    secret = agent.data_dir / "secret.img"
    secret.write_bytes(b"root's secret" + bytes(4096))
    with agent.client() as api:
        api.create_vm(guest_spec("swap", drives=[{"path": str(disk)}]))
        disk.unlink()
        disk.symlink_to(secret)
        # refused before anything started: a 422 naming the drive, and no VMM
        with pytest.raises(StokerError) as info:
            api.start_vm("swap")
        assert info.value.status == 422
        assert "symbolic link" in info.value.detail
        assert {e["field"] for e in info.value.body["errors"]} == {"drives[0].path"}
        vm = api.get_vm("swap")
        assert vm.state == "pending" and vm.process is None
