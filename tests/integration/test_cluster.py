"""Cluster mode end to end: a real 3-member etcd, three real agents, real guests.

``tests/cluster_world.py`` builds the world: etcd in a hub namespace, each agent in its own
namespace joined to the hub by a veth pair, and a monitor that scans every namespace's QEMUs
five times a second for the whole module; the module fails if any VM ever ran twice. Lease
TTL 4 s, etcd elections 500 ms, at most 3 VMs per node.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from typer.testing import CliRunner

from stoker.cli.main import app as cli
from stoker.client import Client, StokerError
from stoker.wire.cluster import ClusterVMOut
from tests.cluster_world import NAMES, World, cluster_world, running_vms
from tests.etcd_cluster import MISSING, etcd_available
from tests.helpers import guest_spec, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not etcd_available(), reason=MISSING),
]

TTL = 4
FAILOVER_TARGET_S = TTL + 5
runner = CliRunner()


def stoker(world: World, node: str, *args: str) -> str:
    """The CLI against ``node``'s socket; its output (exit status 0 asserted)."""
    socket = str(world.nodes[node].agent.socket)
    result = runner.invoke(cli, ["--socket", socket, *args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with cluster_world(TTL) as built:
        yield built
        assert not built.monitor.violations, built.monitor.violations


# -- helpers -------------------------------------------------------------------------------------


def create(api: Client, name: str, port: int | None = None, **kw: Any) -> ClusterVMOut:
    spec = guest_spec(name, port, restart={"policy": "on-failure", "backoff_initial_s": 0.5})
    placement: dict[str, Any] = {
        k: kw.pop(k) for k in ("selector", "anti_affinity", "policy") if k in kw
    }
    return api.create_cluster_vm(spec, placement=placement, wait_s=20, **kw)


def on_node(world: World, node: str, name: str, port: int, **kw: Any) -> ClusterVMOut:
    """Create a running VM on ``node``: cordon the others for the create (cordons are part
    of what is under test), then lift them."""
    others = [n for n in NAMES if n != node]
    api = world.api(node)
    for other in others:
        api.cordon_node(other, "test: steer a placement")
    try:
        vm = create(api, name, port, **kw)
    finally:
        for other in others:
            api.uncordon_node(other)
    assert vm.node == node, vm
    return vm


def wait_running(api: Client, name: str, timeout: float = 60) -> ClusterVMOut:
    def running() -> ClusterVMOut | None:
        vm = api.get_cluster_vm(name)
        return vm if vm.state == "running" else None

    try:
        return wait_for(running, timeout, 0.1)  # type: ignore[no-any-return]
    except TimeoutError:
        raise AssertionError(f"{name} not running: {api.get_cluster_vm(name)}") from None


def wait_gone(world: World, names: list[str], timeout: float = 30) -> None:
    api = world.api("n1")
    for name in names:
        with contextlib.suppress(StokerError):
            api.delete_cluster_vm(name)

    def gone() -> bool:
        listed = {vm.name for vm in api.all_cluster_vms()}
        local = {vm.name for node in world.nodes.values() for vm in node.api().list_vms()}
        return not (set(names) & (listed | local))

    wait_for(gone, timeout, 0.2)


def elapsed(since: float) -> float:
    return time.monotonic() - since


def poll(check: Callable[[], bool], timeout: float, interval: float = 0.02) -> float:
    """Seconds until ``check()`` held (TimeoutError after ``timeout``)."""
    start = time.monotonic()
    wait_for(check, timeout, interval)
    return elapsed(start)


# -- placement -----------------------------------------------------------------------------------


def test_nine_vms_through_one_node_binpack_spread_and_anti_affinity(world: World) -> None:
    api = world.api("n1")
    layout: dict[str, str | None] = {}
    rules: tuple[tuple[str, dict[str, Any]], ...] = (
        *((f"b{i}", {"policy": "binpack"}) for i in (1, 2, 3)),
        *((f"s{i}", {"policy": "spread"}) for i in (1, 2, 3)),
        *((f"a{i}", {"policy": "binpack", "anti_affinity": "web"}) for i in (1, 2, 3)),
    )
    for name, kw in rules:
        vm = create(api, name, start=False, **kw)
        layout[name] = vm.node
    assert layout == {
        "b1": "n1", "b2": "n1", "b3": "n1",  # binpack fills n1 (3 VMs at most per node)
        "s1": "n2", "s2": "n3", "s3": "n2",  # spread: fewest VMs first
        "a1": "n2", "a2": "n3", "a3": None,  # one of group web per node; none left for a3
    }  # fmt: skip
    # any node answers, with the same picture
    assert {vm.name: vm.node for vm in world.api("n3").all_cluster_vms()} == layout
    explained = {v.node: v.reasons for v in api.explain_cluster_vm("a3").verdicts}
    assert explained["n1"] == ["VMs: all 3 slots in use"]
    assert "anti-affinity: group web already on this node" in explained["n2"]
    assert explained["n3"] == ["anti-affinity: group web already on this node"]
    assert world.api("n2").get_cluster_vm("a3").state == "unplaced"
    explained_text = stoker(world, "n2", "cluster", "explain", "a3")
    assert "a3: not placed" in explained_text
    assert "n3: anti-affinity: group web already on this node" in explained_text
    # the placed node keeps a local copy, labelled with the cluster incarnation
    local = {vm.name: vm for vm in world.api("n2").list_vms()}
    assert set(local) == {"s1", "s3", "a1"}
    assert all("stoker.cluster/incarnation" in vm.spec.labels for vm in local.values())
    wait_gone(world, list(layout))


def test_drain_moves_vms_off_a_node_respecting_anti_affinity(world: World) -> None:
    api = world.api("n2")
    d1 = create(api, "d1", start=False, anti_affinity="db", policy="spread")
    d2 = create(api, "d2", start=False, anti_affinity="db", policy="spread")
    assert (d1.node, d2.node) == ("n1", "n2")
    drained = stoker(world, "n2", "node", "drain", "n1", "--reason", "test", "--wait", "15")
    assert "n1  draining" in drained
    assert api.get_cluster_vm("d1").node == "n3"  # not n2: group db is there
    assert api.get_cluster_vm("d1").previous_node == "n1"
    wait_for(lambda: "d1" not in {v.name for v in world.api("n1").list_vms()}, 15, 0.1)
    assert api.uncordon_node("n1").state == "ready"
    wait_gone(world, ["d1", "d2"])


def test_concurrent_creates_of_one_name_on_two_nodes_one_wins(world: World) -> None:
    for round_ in range(5):
        outcomes = _race(world, f"dup-{round_}")
        won = [o for o in outcomes.values() if isinstance(o, ClusterVMOut)]
        lost = [o for o in outcomes.values() if isinstance(o, StokerError)]
        assert len(won) == 1 and len(lost) == 1, outcomes
        assert lost[0].status == 409
        assert f"a cluster VM named 'dup-{round_}' already exists" in lost[0].detail
    wait_gone(world, [f"dup-{i}" for i in range(5)])


def _race(world: World, name: str) -> dict[str, object]:
    """Create ``name`` through n1 and n2 at the same moment."""
    barrier = threading.Barrier(2)
    outcomes: dict[str, object] = {}

    def create_via(node: str) -> None:
        with world.api(node) as api:
            barrier.wait()
            try:
                outcomes[node] = api.create_cluster_vm(guest_spec(name), start=False)
            except StokerError as exc:
                outcomes[node] = exc

    threads = [threading.Thread(target=create_via, args=(n,)) for n in ("n1", "n2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


# -- failures ------------------------------------------------------------------------------------


def test_node_death_restarts_its_stateless_vms_elsewhere_within_ttl_plus_5(world: World) -> None:
    n1 = world.nodes["n1"]
    on_node(world, "n1", "mv1", 18081)
    on_node(world, "n1", "st1", 18082, stateless=False)
    for name, port in (("mv1", 18081), ("st1", 18082)):
        wait_running(world.api("n2"), name)
        wait_for(functools.partial(n1.answers, port), 20, 0.1)

    began = time.monotonic()
    n1.kill_everything()
    survivors = [world.nodes["n2"], world.nodes["n3"]]
    poll(lambda: any(node.answers(18081) for node in survivors), 30, 0.05)
    print(f"\nnode death -> VM answering on another node: {elapsed(began):.2f} s")
    assert elapsed(began) <= FAILOVER_TARGET_S, f"failover took {elapsed(began):.2f} s"

    api = world.api("n2")
    moved = wait_running(api, "mv1", 10)
    assert moved.node in ("n2", "n3") and moved.previous_node == "n1"
    kept = api.get_cluster_vm("st1")
    assert (kept.node, kept.state, kept.movable) == ("n1", "unknown", False)
    assert kept.note is not None and "not moved: declared stateful" in kept.note
    assert "starts again when n1 returns" in kept.note

    n1.start_agent()  # the node comes back: its stateful VM starts there again
    wait_running(api, "st1", 60)
    wait_for(lambda: n1.answers(18082), 20, 0.1)
    assert api.get_cluster_vm("st1").note is None
    wait_for(lambda: "mv1" not in {v.name for v in n1.api().list_vms()}, 15, 0.1)


def fenced_before_expiry(world: World, node: str, vm: str) -> dict[str, float]:
    """Watch until ``vm`` no longer runs on ``node`` and ``node``'s alive key is gone from
    etcd; returns when each was first seen (monotonic seconds)."""
    seen: dict[str, float] = {}

    def both() -> bool:
        now = time.monotonic()
        if "vmm" not in seen and node not in dict(running_vms(world.nodes).get(vm, [])):
            seen["vmm"] = now
        if "lease" not in seen and world.etcd.get(f"/stoker/alive/{node}") is None:
            seen["lease"] = now
        return len(seen) == 2

    poll(both, 4 * world.ttl, 0.02)
    return seen


def test_partition_fences_the_node_before_its_lease_expires(world: World) -> None:
    n2 = world.nodes["n2"]
    on_node(world, "n2", "pt1", 18083)
    wait_running(world.api("n1"), "pt1")
    wait_for(lambda: n2.answers(18083), 20, 0.1)
    assert world.etcd.get("/stoker/alive/n2") is not None

    began = time.monotonic()
    n2.link(up=False)
    try:
        seen = fenced_before_expiry(world, "n2", "pt1")
        standing = n2.api().cluster().standing
        print(
            f"\npartition: VMs killed {seen['vmm'] - began:.2f} s after the cut, lease "
            f"expired {seen['lease'] - began:.2f} s after it (TTL {TTL} s); n2 says {standing}"
        )
        assert seen["vmm"] < seen["lease"], seen
        assert standing in ("fenced", "expired")
        others = [world.nodes["n1"], world.nodes["n3"]]
        poll(lambda: any(node.answers(18083) for node in others), FAILOVER_TARGET_S, 0.05)
    finally:
        n2.link(up=True)
    wait_for(world.ready, 30, 0.2)
    wait_for(lambda: "pt1" not in {v.name for v in n2.api().list_vms()}, 20, 0.1)
    assert "n2" not in dict(running_vms(world.nodes).get("pt1", []))


def test_a_dead_agent_s_guard_kills_its_vms_before_the_lease_expires(world: World) -> None:
    """VMMs outlive their agent by design; in a cluster the fence guard process ends them
    before the lease can expire and another node starts them."""
    n3 = world.nodes["n3"]
    on_node(world, "n3", "gd1", 18084)
    wait_running(world.api("n1"), "gd1")
    wait_for(lambda: n3.answers(18084), 20, 0.1)

    began = time.monotonic()
    n3.kill_agent()
    seen = fenced_before_expiry(world, "n3", "gd1")
    print(
        f"\nagent death: guard killed the VMs {seen['vmm'] - began:.2f} s after it, lease "
        f"expired {seen['lease'] - began:.2f} s after it"
    )
    assert seen["vmm"] < seen["lease"], seen
    others = [world.nodes["n1"], world.nodes["n2"]]
    poll(lambda: any(node.answers(18084) for node in others), FAILOVER_TARGET_S, 0.05)
    n3.start_agent()
    wait_for(world.ready, 30, 0.2)
    wait_for(lambda: "gd1" not in {v.name for v in n3.api().list_vms()}, 20, 0.1)
    wait_gone(world, ["gd1"])


def test_killing_the_etcd_leader_does_not_stop_placement(world: World) -> None:
    leader = world.etcd.leader()
    world.etcd.kill(leader)
    try:

        def placed() -> ClusterVMOut | None:
            try:
                vm = world.api("n3").create_cluster_vm(guest_spec("lk1"), start=False, wait_s=5)
            except StokerError as exc:
                if exc.status == 409:  # an earlier try got through
                    vm = world.api("n3").get_cluster_vm("lk1")
                elif exc.status == 503:
                    return None
                else:
                    raise
            return vm if vm.node is not None else None

        vm = wait_for(placed, 20, 0.2)
        assert vm.node in NAMES
    finally:
        world.etcd.restart(leader)
    assert world.ready()
    wait_gone(world, ["lk1"])


def test_all_of_etcd_down_vms_keep_running_recover_locally_then_reconcile(world: World) -> None:
    before = running_vms(world.nodes)
    assert {"mv1", "st1", "pt1"} <= set(before), before
    mv1_node, mv1_pid = before["mv1"][0]
    world.etcd.kill_all()
    try:
        time.sleep(2 * TTL)  # far past every fence deadline, were the nodes not holding
        during = running_vms(world.nodes)
        for name in ("mv1", "st1", "pt1"):
            assert during[name] == before[name], (name, before[name], during.get(name))
        summary = world.api(mv1_node).cluster()
        assert summary.standing == "hold", summary
        with pytest.raises(StokerError) as refused:
            world.api("n1").create_cluster_vm(guest_spec("nope"), start=False)
        assert refused.value.status == 503
        assert "cluster writes are unavailable" in refused.value.detail

        os.kill(mv1_pid, signal.SIGKILL)  # its own restart policy brings it back, locally
        node = world.nodes[mv1_node]
        wait_for(
            lambda: [p for _, p in running_vms(world.nodes).get("mv1", [])] not in ([], [mv1_pid]),
            30,
            0.1,
        )
        wait_for(lambda: node.answers(18081), 30, 0.1)
    finally:
        world.etcd.restart_all()
    wait_for(lambda: world.ready(), 30, 0.2)
    api = world.api("n3")
    for name in ("mv1", "st1", "pt1"):
        wait_running(api, name, 30)
    after = running_vms(world.nodes)
    for name in ("st1", "pt1"):
        assert after[name] == before[name], (name, before[name], after[name])
    assert len(after["mv1"]) == 1 and after["mv1"][0][0] == mv1_node
    assert not world.monitor.violations, world.monitor.violations
