"""Cluster networks on the node and in placement, on hand-made facts: what a node makes,
leaves alone and deletes (``cluster.networks.plan_networks``), and how the scheduler keeps VMs
on a cluster network to the nodes where it is ready (``planner.choose``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from stoker.cluster.networks import (
    CLUSTER_MANAGER,
    Wanted,
    conflict,
    network_of,
    not_ready,
    plan_networks,
)
from stoker.cluster.planner import Snapshot, explain, plan
from stoker.cluster.records import (
    CapacityRecord,
    NetworkRecord,
    NodeInfo,
    NodeNetworksRecord,
    VMRecord,
)
from stoker.domain.networks import Isolation, NetworkSpec
from stoker.domain.networks import NetworkRecord as LocalNetwork
from stoker.domain.spec import VMSpec

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
GiB = 1024**3


def wanted(name: str = "back", subnet: str = "10.90.0.0/24", rev: int = 7, **kw: Any) -> Wanted:
    return Wanted(name, rev, NetworkSpec(name=name, subnet=subnet, **kw))


def local(
    name: str = "back",
    subnet: str = "10.90.0.0/24",
    managed_by: str = CLUSTER_MANAGER,
    **kw: Any,
) -> LocalNetwork:
    fields: dict[str, Any] = {
        "id": "0123456789abcdef",
        "name": name,
        "subnet": subnet,
        "gateway": subnet.rsplit(".", 1)[0] + ".1",
        "isolation": Isolation.ISOLATED,
        "bridge": "stkb0123456789",
        "created_at": NOW,
        "managed_by": managed_by,
        **kw,
    }
    return LocalNetwork(**fields)


# -- the node's decisions ------------------------------------------------------------------------


def test_a_missing_network_is_made_and_reported_pending_until_then() -> None:
    todo = plan_networks({"back": wanted()}, [], {}, may_delete=True)
    assert [w.name for w in todo.create] == ["back"]
    assert not todo.ready and todo.problems["back"].startswith("pending")


def test_a_matching_cluster_copy_is_ready_at_the_definition_s_revision() -> None:
    todo = plan_networks({"back": wanted(rev=9)}, [local()], {}, may_delete=True)
    assert (todo.create, todo.delete, dict(todo.ready)) == ((), (), {"back": 9})


def test_a_local_network_the_cluster_does_not_manage_is_a_conflict_and_never_touched() -> None:
    mine = local(managed_by="api")
    todo = plan_networks({"back": wanted()}, [mine], {}, may_delete=True)
    assert todo.create == () and todo.delete == () and not todo.ready
    assert todo.problems["back"].startswith("conflict: a local network 'back'")
    assert "made by api" in todo.problems["back"]


@pytest.mark.parametrize(
    ("copy", "says"),
    [
        (local(subnet="10.91.0.0/24"), "subnet 10.91.0.0/24 here, 10.90.0.0/24 in the cluster"),
        (local(isolation=Isolation.OPEN), "isolation open here, isolated in the cluster"),
        (local(ipv6_subnet="fd00::/64"), "ipv6 True here, False in the cluster"),
        (local(uplink="eth1"), "uplink eth1 here, None in the cluster"),
    ],
)
def test_a_cluster_copy_whose_definition_differs_is_a_conflict_left_alone(
    copy: LocalNetwork, says: str
) -> None:
    todo = plan_networks({"back": wanted()}, [copy], {}, may_delete=True)
    assert todo.create == () and todo.delete == () and not todo.ready
    assert todo.problems["back"].startswith("conflict: this node's copy")
    assert says in todo.problems["back"]


def test_a_subnet_spelled_otherwise_is_the_same_subnet() -> None:
    assert conflict(NetworkSpec(name="back", subnet="10.90.0.7/24"), local()) is None


def test_a_named_bridge_must_match_a_derived_one_need_not() -> None:
    named = NetworkSpec(name="back", subnet="10.90.0.0/24", bridge="br-back")
    why = conflict(named, local())
    assert why is not None and "bridge stkb0123456789 here, br-back in the cluster" in why
    assert conflict(named, local(bridge="br-back")) is None


def test_a_copy_that_left_the_cluster_is_deleted_once_no_vm_uses_it_and_etcd_answers() -> None:
    copy = local("old")
    gone = plan_networks({}, [copy], {}, may_delete=True)
    assert gone.delete == ("old",)
    used = plan_networks({}, [copy], {"old": ["web", "db"]}, may_delete=True)
    assert used.delete == () and "kept while VMs use it: db, web" in used.kept["old"]
    offline = plan_networks({}, [copy], {}, may_delete=False)
    assert offline.delete == () and "until etcd answers" in offline.kept["old"]


def test_local_networks_of_others_are_never_deleted() -> None:
    theirs = [local("lab", managed_by="api"), local("default", managed_by="config")]
    assert plan_networks({}, theirs, {}, may_delete=True).delete == ()


def test_a_node_without_managed_networking_reports_why_and_makes_nothing() -> None:
    todo = plan_networks({"back": wanted()}, [], {}, may_delete=True, unavailable="not root")
    assert todo.create == ()
    assert todo.problems["back"] == "managed networking is not available on this node: not root"


def test_a_failed_create_waits_for_its_backoff_with_the_error_reported() -> None:
    todo = plan_networks({"back": wanted()}, [], {}, may_delete=True, failed={"back": "boom"})
    assert todo.create == () and todo.problems["back"] == "error: could not make it here: boom"


def test_readiness_is_for_the_current_definition_only() -> None:
    report = NodeNetworksRecord(ready={"back": 7}, problems={"lab": "conflict: x"}, at=NOW)
    assert not_ready(report, "back", 7) is None
    assert not_ready(report, "back", 8) == "its copy is of an older definition of this name"
    assert not_ready(report, "lab", 3) == "conflict: x"
    assert not_ready(report, "new", 3) == "not set up yet"
    assert not_ready(None, "back", 7) == "the node has not reported its cluster networks yet"


def test_only_a_named_managed_network_counts() -> None:
    def spec(network: dict[str, Any]) -> VMSpec:
        return VMSpec.model_validate({"name": "web", "kernel": "/k", "network": network})

    assert network_of(spec({"mode": "managed", "name": "back"})) == "back"
    assert network_of(spec({"mode": "user"})) is None


def test_records_refuse_what_a_local_create_refuses() -> None:
    with pytest.raises(ValueError, match="bridge"):
        NetworkRecord.model_validate_json(
            '{"spec": {"name": "back", "subnet": "10.90.0.0/24", "bridge": "'
            + "b" * 16
            + '"}, "created_by": "n1", "created_at": "2026-11-30T12:00:00Z"}'
        )
    with pytest.raises(ValueError):
        NodeNetworksRecord(ready={}, problems={"x": "y" * 2001}, at=NOW)


# -- placement -----------------------------------------------------------------------------------


def node(name: str) -> NodeInfo:
    capacity = CapacityRecord(
        physical_cpus=2, memory_bytes=4 * GiB, max_vms=3, cpu_overcommit=4, memory_headroom=0.25
    )
    return NodeInfo(name=name, capacity=capacity, version="test", started_at=NOW)


def vm_on(name: str, network: str | None) -> VMRecord:
    net = {"mode": "managed", "name": network} if network else {"mode": "none"}
    spec = VMSpec.model_validate({"name": name, "kernel": "/k", "memory_mib": 256, "network": net})
    return VMRecord(spec=spec, created_by="n1", created_at=NOW)


def snap(reports: dict[str, NodeNetworksRecord], vms: dict[str, VMRecord]) -> Snapshot:
    return Snapshot(
        nodes={n: node(n) for n in ("n1", "n2", "n3")},
        alive=frozenset({"n1", "n2", "n3"}),
        cordons={},
        vms={name: (i + 10, rec) for i, (name, rec) in enumerate(vms.items())},
        placements={},
        networks={"back": 5},
        node_networks=reports,
    )


def ready(*names: str) -> NodeNetworksRecord:
    return NodeNetworksRecord(ready={n: 5 for n in names}, at=NOW)


def test_a_vm_on_a_cluster_network_goes_only_where_it_is_ready() -> None:
    reports = {
        "n1": NodeNetworksRecord(problems={"back": "conflict: a local network"}, at=NOW),
        "n2": ready("back"),
    }
    s = snap(reports, {"web": vm_on("web", "back")})
    [change] = plan(s, "n1", NOW)
    assert change.placement is not None and change.placement.node == "n2"
    lines = {v.node: v.reasons for v in explain(s, "web").verdicts()}
    assert lines["n1"][0] == "network back not ready here: conflict: a local network"
    assert lines["n2"][0].startswith("chosen")
    assert lines["n3"] == ("network back not ready here: the node has not reported its "
                           "cluster networks yet",)  # fmt: skip


def test_nowhere_ready_leaves_it_unplaced_saying_why() -> None:
    s = snap({}, {"web": vm_on("web", "back")})
    [change] = plan(s, "n1", NOW)
    assert change.placement is not None and change.placement.node is None
    assert change.placement.summary == "no node fits (3 nodes: 3 network back not ready here)"


def test_other_networks_do_not_filter() -> None:
    s = snap({}, {"a": vm_on("a", None), "b": vm_on("b", "node-local")})
    placed = {c.vm: c.placement.node for c in plan(s, "n1", NOW) if c.placement}
    assert placed["a"] is not None and placed["b"] is not None
