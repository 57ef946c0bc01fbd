"""Cluster networks end to end: a real 3-member etcd, three real agents in their own network
namespaces (``tests/cluster_world.py``), each making its own bridge, nftables rules and
dnsmasq for every cluster network, and one real guest taking its address by DHCP there.

The world is the cluster tests' one with managed networking switched on in the agents; the
bridges, rules and dnsmasqs go with the namespaces, dnsmasq's state directories are removed
here.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tests.cluster_world as cw
from stoker.cli.main import app as cli
from stoker.client import StokerError
from stoker.services.networks.config import RUN_DIR, default_state_dir
from stoker.wire.networks import NetworkOut
from tests.cluster_world import NAMES, World
from tests.etcd_cluster import MISSING, etcd_available
from tests.helpers import guest_spec, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not etcd_available(), reason=MISSING),
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("qemu-system-x86_64", "nft", "dnsmasq", "ip")),
        reason="needs qemu-system-x86, nftables, dnsmasq-base and iproute2",
    ),
]

TTL = 4
SUBNET = "10.248.7.0/24"
CLASH_SUBNET = "10.248.9.0/24"
PORT = 8088  # the guest's forward, on its node's loopback
runner = CliRunner()


def stoker(world: World, node: str, *args: str) -> str:
    socket = str(world.nodes[node].agent.socket)
    result = runner.invoke(cli, ["--socket", socket, *args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    state_dirs: list[Path] = []
    try:
        with cw.cluster_world(TTL, managed_networks=True) as built:
            state_dirs = [default_state_dir(n.agent.data_dir) for n in built.nodes.values()]
            yield built
            assert not built.monitor.violations, built.monitor.violations
    finally:
        for path in state_dirs:
            shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(OSError):
            RUN_DIR.rmdir()  # only when no other agent's state is left in it


def local(world: World, node: str, name: str) -> NetworkOut | None:
    return next((n for n in world.api(node).list_networks() if n.name == name), None)


def test_a_cluster_network_made_through_n1_exists_on_every_node(world: World) -> None:
    started = time.monotonic()
    made = world.api("n1").create_cluster_network("cnet", SUBNET, isolation="open")
    assert (made.subnet, made.created_by) == (SUBNET, "n1")

    def everywhere() -> bool:
        copies = [local(world, node, "cnet") for node in NAMES]
        return all(c is not None and c.subnet == SUBNET for c in copies)

    wait_for(everywhere, 5, 0.05)
    took = time.monotonic() - started
    print(f"\ncluster network on all 3 nodes (bridge, nft, dnsmasq each): {took:.2f} s")
    for node in NAMES:
        copy = local(world, node, "cnet")
        assert copy is not None and copy.managed_by == "cluster" and copy.isolation == "open"

    def ready() -> bool:
        states = {n.node: n.state for n in world.api("n3").cluster_network("cnet").nodes}
        return states == dict.fromkeys(NAMES, "ready")

    wait_for(ready, 5, 0.05)
    listed = stoker(world, "n2", "cluster", "network", "list")
    assert "cnet" in listed and SUBNET in listed and "3/3" in listed
    shown = stoker(world, "n3", "cluster", "network", "show", "cnet")
    assert all(f"{node}: ready" in shown for node in NAMES), shown
    assert "addresses are per node" in shown


def test_a_vm_on_it_takes_its_address_by_dhcp_and_answers_through_its_forward(
    world: World,
) -> None:
    spec = guest_spec("cweb")
    spec["network"] = {
        "mode": "managed",
        "name": "cnet",
        "port_forwards": [{"host_port": PORT, "guest_port": 80}],
    }
    vm = world.api("n1").create_cluster_vm(spec, wait_s=20)
    assert vm.node in NAMES, vm
    node = world.nodes[vm.node]
    wait_for(lambda: node.answers(PORT), 60, 0.1)
    copy = local(world, vm.node, "cnet")
    assert copy is not None
    [lease] = [lease for lease in copy.leases if lease.vm_name == "cweb"]
    assert lease.address.startswith("10.248.7.")
    console = node.api().console("cweb", 65536).text
    assert f"stoker-dhcp: bound {lease.address}/24 via 10.248.7.1" in console
    explained = world.api("n2").explain_cluster_vm("cweb")
    assert not any("network" in r for v in explained.verdicts for r in v.reasons), explained.text


def test_a_local_network_of_the_same_name_is_left_alone_and_its_node_not_used(
    world: World,
) -> None:
    n3 = world.api("n3")
    n3.create_network("clash", CLASH_SUBNET)  # an operator's own network on n3
    try:
        world.api("n1").create_cluster_network("clash", CLASH_SUBNET)

        def reported() -> dict[str, str]:
            nodes = world.api("n1").cluster_network("clash").nodes
            states: dict[str, str] = {n.node: n.state for n in nodes}
            return states if states == {"n1": "ready", "n2": "ready", "n3": "conflict"} else {}

        wait_for(reported, 5, 0.05)
        vm = world.api("n1").create_cluster_vm(
            guest_spec("cx", network={"mode": "managed", "name": "clash"}), start=False, wait_s=10
        )
        assert vm.node in ("n1", "n2"), vm
        verdicts = {v.node: v.reasons for v in world.api("n2").explain_cluster_vm("cx").verdicts}
        assert verdicts["n3"][0].startswith(
            "network clash not ready here: conflict: a local network 'clash'"
        ), verdicts
        shown = stoker(world, "n1", "cluster", "explain", "cx")
        assert "n3: network clash not ready here: conflict" in shown
        world.api("n1").delete_cluster_vm("cx")
        wait_for(lambda: world.api("n1").cluster_network("clash").vms == [], 5, 0.05)
        wait_for(lambda: "cx" not in {v.name for v in world.api(vm.node or "").list_vms()}, 10)
        world.api("n1").delete_cluster_network("clash")
        wait_for(lambda: local(world, "n1", "clash") is None, 5, 0.05)
        wait_for(lambda: local(world, "n2", "clash") is None, 5, 0.05)
        mine = local(world, "n3", "clash")
        assert mine is not None and mine.managed_by == "api"  # never touched
    finally:
        with contextlib.suppress(StokerError):
            n3.delete_network("clash")


def test_deleting_the_network_is_refused_while_a_vm_names_it_then_its_copies_go(
    world: World,
) -> None:
    api = world.api("n2")
    with pytest.raises(StokerError) as refused:
        api.delete_cluster_network("cnet")
    assert refused.value.status == 409
    assert "in use by 1 cluster VM(s): cweb" in refused.value.detail
    api.delete_cluster_vm("cweb")
    wait_for(
        lambda: all("cweb" not in {v.name for v in world.api(n).list_vms()} for n in NAMES), 20
    )
    api.delete_cluster_network("cnet")
    wait_for(lambda: all(local(world, n, "cnet") is None for n in NAMES), 5, 0.05)
    with pytest.raises(StokerError) as gone:
        api.cluster_network("cnet")
    assert gone.value.status == 404
