"""Quotas and counters on a managed network's TAP: both network limits bind (tbf,
nftables), the seed's quota line is enforceable on a VM created with defaults, traffic is
counted in the agent's own namespace, and what lets an agent make networks."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from stoker.domain.quota import Quota, plan
from stoker.domain.spec import VMSpec
from stoker.drivers.firecracker.driver import CAPABILITIES as FC_CAPS
from stoker.drivers.qemu import CAPABILITIES as QEMU_CAPS
from stoker.services.networks import NetworkConfig
from stoker.services.networks.availability import probe
from stoker.services.sampling import read_net_dev, read_tap_counters

MANAGED = {"mode": "managed"}


def spec(**kw: object) -> VMSpec:
    return VMSpec.model_validate({"name": "web-server", "kernel": "/k", **kw})


def test_qemu_on_a_managed_network_binds_bandwidth_and_packets() -> None:
    result = plan(Quota(network_mbps=100, network_pps=1000), spec(network=MANAGED), QEMU_CAPS)
    assert result.unenforceable == {}
    assert "tc tbf" in result.enforced["network_mbps"]
    assert "nftables" in result.enforced["network_pps"]


def test_the_seed_line_is_enforceable_on_a_default_vm() -> None:
    seed = Quota(cpu_percent=200, memory_mib=4096, disk_gib=100, network_mbps=100)
    result = plan(seed, spec(memory_mib=256, network=MANAGED), QEMU_CAPS)
    assert result.unenforceable == {}
    assert set(result.enforced) == {"cpu_percent", "memory_mib", "disk_gib", "network_mbps"}


def test_firecracker_on_a_managed_network_limits_itself() -> None:
    vm = spec(hypervisor="firecracker", network=MANAGED)
    result = plan(Quota(network_mbps=10, network_pps=100), vm, FC_CAPS)
    assert "Firecracker" in result.enforced["network_mbps"]


def test_user_mode_still_refused_and_says_what_to_use() -> None:
    refused = plan(Quota(network_mbps=10), spec(network={"mode": "user"}), QEMU_CAPS)
    assert "network mode 'managed'" in refused.unenforceable["network_mbps"]


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"enabled": False}, "[network] enabled = false"),
        ({"nft_binary": "/nonexistent/nft"}, "install nftables"),
        ({"dnsmasq_binary": "/nonexistent/dnsmasq"}, "install dnsmasq-base"),
    ],
)
def test_what_keeps_an_agent_from_making_networks(
    tmp_path: Path, config: dict[str, object], reason: str
) -> None:
    found = probe(NetworkConfig.model_validate(config), tmp_path / "networks")
    assert not found.available and reason in found.reason


def test_dnsmasq_must_reach_its_state_directory() -> None:
    root = Path(tempfile.mkdtemp(prefix="stk-", dir="/tmp"))  # mode 0700, like a data dir
    try:
        found = probe(NetworkConfig(), root / "networks")
        if found.reason.startswith("the agent does not run as root"):
            pytest.skip("needs root: the check comes after the root check")
        assert not found.available and f"chmod o+x {root}" in found.reason
        root.chmod(0o755)
        assert probe(NetworkConfig(), root / "networks").available
    finally:
        root.rmdir()


def test_config_refuses_a_public_default_subnet_and_a_short_lease() -> None:
    with pytest.raises(ValueError, match="not private"):
        NetworkConfig(default_subnet="8.8.8.0/24")
    with pytest.raises(ValueError, match="at least 120 seconds"):
        NetworkConfig(lease_time="60s")


def test_tap_counters_come_from_the_agents_own_namespace(tmp_path: Path) -> None:
    """/proc/net/dev shows the reader's network namespace (sysfs shows the mounter's); the
    host's transmit counter is what the guest received."""
    dev = tmp_path / "dev"
    dev.write_text(
        "Inter-|   Receive                                                |  Transmit\n"
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets\n"
        "    lo:     100       1    0    0    0     0          0         0      100       1"
        "    0    0    0     0       0          0\n"
        "stkt0123456789a: 5000      40    0    0    0     0          0         0  9000000"
        "    6000    0    0    0     0       0          0\n"
    )
    assert read_tap_counters("stkt0123456789a", dev) == (9_000_000, 5000)
    assert read_tap_counters("stktmissing0000", dev) is None
    assert read_net_dev(tmp_path / "absent") == {}
