"""The API is a trust boundary: what was found reproduced against a real agent, each refused.

Every case here was accepted (201) before confinement and image pools: a drive, kernel or
initrd naming a host file, an exec probe with an argv, QEMU options smuggled through commas
in a path, a forward address or a MAC. Now each is a 4xx naming the field, and nothing is
left on disk.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from stoker.client import StokerError
from tests.helpers import AgentProcess, guest_spec


def listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


def refused(agent: AgentProcess, spec: dict[str, Any]) -> StokerError:
    """Create must answer 4xx problem+json and leave neither a VM nor a file behind."""
    before = listing(agent.data_dir / "vms")
    with agent.client() as api, pytest.raises(StokerError) as info:
        api.create_vm(spec)
    error = info.value
    assert 400 <= error.status < 500, error.body
    assert error.body["type"] == "about:blank"
    assert listing(agent.data_dir / "vms") == before
    with agent.client() as api:
        assert api.list_vms() == []
    return error


def field_of(error: StokerError) -> set[str]:
    return {e["field"] for e in error.body.get("errors", [])}


@pytest.fixture
def pool_disk(agent: AgentProcess) -> Path:
    disk = agent.images / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    os.chmod(disk, 0o600)
    return disk


@pytest.mark.parametrize("where", ["kernel", "initrd", "drive"])
@pytest.mark.parametrize(
    "target",
    ["/etc/shadow", "/tmp/../etc/shadow", "symlink-in-pool", "database", "outside-file"],
)
def test_host_files_are_not_images(agent: AgentProcess, where: str, target: str) -> None:
    if target == "symlink-in-pool":
        link = agent.images / "shadow-link"
        link.symlink_to("/etc/shadow")
        path = str(link)
    elif target == "database":
        path = str(agent.data_dir / "stoker.db")
    elif target == "outside-file":
        outside = agent.data_dir / "outside.img"
        outside.write_bytes(b"x")
        path = str(outside)
    else:
        path = target
    spec = guest_spec("probe")
    if where == "drive":
        spec["drives"] = [{"path": path}]
    else:
        spec[where] = path
    error = refused(agent, spec)
    assert error.status == 422
    expected = "drives[0].path" if where == "drive" else where
    assert field_of(error) == {expected}, error.body
    assert "image pool" in error.detail or "symbolic link" in error.detail


def test_exec_probes_cannot_carry_an_argv(agent: AgentProcess) -> None:
    argv = {"kind": "exec", "argv": ["/bin/sh", "-c", "id > /tmp/pwned"]}
    error = refused(agent, guest_spec("probe", probes=[argv]))
    assert error.status == 422
    unknown = {"kind": "exec", "command": "pwn"}
    error = refused(agent, guest_spec("probe", probes=[unknown]))
    assert error.status == 422 and "[health.commands]" in error.detail
    assert not Path("/tmp/pwned").exists()


def test_probes_aim_only_at_the_vm(agent: AgentProcess) -> None:
    """A probe runs on the host as the agent: it must not become a way to reach elsewhere."""
    http = {"kind": "http", "url": "http://169.254.169.254/latest/meta-data/"}
    error = refused(agent, guest_spec("probe", probes=[http]))
    assert field_of(error) == {"probes[0].url"}
    tcp = {"kind": "tcp", "host": "127.0.0.1", "port": 22}
    error = refused(agent, guest_spec("probe", probes=[tcp]))
    assert field_of(error) == {"probes[0].host"}


@pytest.mark.parametrize(
    ("network", "field"),
    [
        (
            {
                "mode": "user",
                "port_forwards": [
                    {"host_port": 8080, "guest_port": 80, "host_addr": "0.0.0.0,tftp=/"}
                ],
            },
            "network.port_forwards[0].host_addr",
        ),
        (
            {
                "mode": "user",
                "port_forwards": [
                    {
                        "host_port": 8080,
                        "guest_port": 80,
                        "host_addr": "127.0.0.1,guestfwd=tcp:10.0.2.100:1-cmd:id",
                    }
                ],
            },
            "network.port_forwards[0].host_addr",
        ),
        ({"mode": "user", "mac": "52:54:00:12:34:56,romfile=/etc/shadow"}, "network.mac"),
        ({"mode": "user", "mac": "01:00:5e:00:00:01"}, "network.mac"),
        ({"mode": "tap", "tap": "tap0,vhost=on"}, "network"),
    ],
)
def test_no_option_injection_through_network_values(
    agent: AgentProcess, network: dict[str, Any], field: str
) -> None:
    error = refused(agent, guest_spec("probe", network=network))
    assert error.status == 422
    assert field_of(error) == {field}, error.body


def test_a_comma_in_a_drive_path_is_a_file_name_never_an_option(
    agent: AgentProcess, pool_disk: Path
) -> None:
    # the path does not exist: refused, not opened "up to the comma"
    error = refused(agent, guest_spec("probe", drives=[{"path": f"{pool_disk},cache=unsafe"}]))
    assert field_of(error) == {"drives[0].path"}
    # a file that really has a comma in its name is just that file, by descriptor
    odd = agent.images / "odd,cache=unsafe.img"
    odd.write_bytes(bytes(1 << 20))
    with agent.client() as api:
        vm = api.create_vm(guest_spec("odd", drives=[{"path": str(odd)}]))
        vm = api.start_vm("odd")
        assert vm.state == "running", vm.state_reason
        assert vm.process is not None
        argv = Path(f"/proc/{vm.process.pid}/cmdline").read_bytes().split(b"\0")
        assert not any(b"cache=unsafe" in a for a in argv)
        assert not any(str(odd).encode() in a for a in argv)
        api.stop_vm("odd", graceful=False)
