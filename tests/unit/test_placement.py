"""Cluster placement: hand-worked layouts, every reason a node can be refused, and properties
(memory never overcommitted, no placement on a cordoned or lost node, spread balances counts,
the answer does not depend on the order nodes are listed in)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stoker.domain.capacity import Allocation, NodeCapacity, Request, check_fit, reserve
from stoker.domain.placement import (
    NodeRecord,
    VMRequest,
    assign,
    place,
    place_all,
)
from stoker.domain.units import GiB, MiB

# 4 CPUs x 2 overcommit = 8 vCPUs; 4 GiB with a quarter kept for the host = 3072 MiB for guests
SMALL = NodeCapacity(physical_cpus=4, memory_bytes=4 * GiB, memory_headroom=0.25)


def three_nodes(**kw: object) -> list[NodeRecord]:
    return [NodeRecord(name, SMALL, **kw) for name in ("node-a", "node-b", "node-c")]  # type: ignore[arg-type]


def vms(count: int, prefix: str = "vm", **kw: object) -> list[VMRequest]:
    return [VMRequest(f"{prefix}-{i}", 1, 512 * MiB, **kw) for i in range(1, count + 1)]  # type: ignore[arg-type]


def layout(requests: list[VMRequest], nodes: list[NodeRecord]) -> dict[str, list[str]]:
    decisions, _after = place_all(requests, nodes)
    out: dict[str, list[str]] = {n.name: [] for n in nodes}
    for d in decisions:
        assert d.node is not None, d.explain()
        out[d.node].append(d.request.name)
    return out


# -- hand-worked layouts: 9 VMs of 1 vCPU / 512 MiB on 3 nodes of 8 vCPUs / 3072 MiB ------------


def test_binpack_fills_one_node_before_the_next() -> None:
    # memory binds first: 3072 / 512 = 6 VMs per node (vCPUs would allow 8)
    assert layout(vms(9), three_nodes()) == {
        "node-a": ["vm-1", "vm-2", "vm-3", "vm-4", "vm-5", "vm-6"],
        "node-b": ["vm-7", "vm-8", "vm-9"],
        "node-c": [],
    }


def test_spread_deals_round_robin() -> None:
    assert layout(vms(9, policy="spread"), three_nodes()) == {
        "node-a": ["vm-1", "vm-4", "vm-7"],
        "node-b": ["vm-2", "vm-5", "vm-8"],
        "node-c": ["vm-3", "vm-6", "vm-9"],
    }


def test_binpack_honours_anti_affinity() -> None:
    # three web VMs must land on three nodes even though binpack would stack them; the six
    # db VMs then pack node-a (it already holds web-1) until its memory is gone
    requests = vms(3, "web", anti_affinity="web") + vms(6, "db")
    assert layout(requests, three_nodes()) == {
        "node-a": ["web-1", "db-1", "db-2", "db-3", "db-4", "db-5"],
        "node-b": ["web-2", "db-6"],
        "node-c": ["web-3"],
    }


def test_a_fourth_member_of_a_group_fits_nowhere() -> None:
    decisions, _ = place_all(vms(4, "web", anti_affinity="web"), three_nodes())
    last = decisions[-1]
    assert last.node is None
    assert last.summary() == "no node fits (3 nodes: 3 anti-affinity)"
    assert "node-b: anti-affinity: group web already on this node" in last.explain()


def test_spread_prefers_fewest_vms_then_least_use() -> None:
    nodes = [
        NodeRecord("node-a", SMALL, Allocation(vms=1, vcpus=4, memory_bytes=2 * GiB)),
        NodeRecord("node-b", SMALL, Allocation(vms=1, vcpus=1, memory_bytes=256 * MiB)),
        NodeRecord("node-c", SMALL, Allocation(vms=2, vcpus=2, memory_bytes=512 * MiB)),
    ]
    decision = place(VMRequest("x", 1, 256 * MiB, policy="spread"), nodes)
    assert decision.node == "node-b"
    assert "node-a: fits, not chosen: spread: 1 VM here" in decision.explain()


def test_ties_go_to_the_first_name_whatever_the_order() -> None:
    nodes = three_nodes()
    for order in (nodes, nodes[::-1], [nodes[1], nodes[2], nodes[0]]):
        assert place(VMRequest("x", 1, MiB), order).node == "node-a"
        assert place(VMRequest("x", 1, MiB, policy="spread"), order).node == "node-a"


# -- explanations ------------------------------------------------------------------------------


def test_every_reason_is_spelled_out() -> None:
    nodes = [
        NodeRecord("n-lost", SMALL, lost=True, labels={"zone": "a"}),
        NodeRecord("n-cordoned", SMALL, cordoned=True, labels={"zone": "a"}),
        NodeRecord("n-zone-b", SMALL, labels={"zone": "b"}),
        NodeRecord("n-unlabelled", SMALL),
        NodeRecord(
            "n-full",
            SMALL,
            Allocation(vms=3, vcpus=8, memory_bytes=2944 * MiB),
            labels={"zone": "a"},
        ),
        NodeRecord("n-web", SMALL, labels={"zone": "a"}, groups={"web": 1}),
        NodeRecord("n-ok", SMALL, Allocation(1, 1, 512 * MiB), labels={"zone": "a"}),
        NodeRecord("n-ok-2", SMALL, labels={"zone": "a"}),
    ]
    request = VMRequest("web-2", 2, 256 * MiB, selector={"zone": "a"}, anti_affinity="web")
    decision = place(request, nodes)
    assert decision.node == "n-ok"
    lines = {v.node: v.line() for v in decision.verdicts()}
    assert lines["n-lost"] == "n-lost: lost: its lease expired (node down or cut off from etcd)"
    assert lines["n-cordoned"] == "n-cordoned: cordoned"
    assert lines["n-zone-b"] == "n-zone-b: selector zone=a: node has zone=b"
    assert lines["n-unlabelled"] == "n-unlabelled: selector zone=a: node has no label zone"
    assert lines["n-full"] == (
        "n-full: vCPUs: needs 2, 0 free of 8 (4 physical CPUs x 2 overcommit); "
        "memory: needs 256 MiB, 128 MiB free of 3072 MiB (host headroom 25% kept free)"
    )
    assert lines["n-web"] == "n-web: anti-affinity: group web already on this node"
    # (3/8 vCPUs + 768/3072 MiB) / 2 = 0.3125; (2/8 + 256/3072) / 2 = 0.1667
    assert lines["n-ok"].startswith("n-ok: chosen: binpack score 0.312")
    assert lines["n-ok-2"].startswith("n-ok-2: fits, not chosen: binpack score 0.167")
    assert decision.explain().splitlines()[0] == "web-2: placed on n-ok (binpack)"


def test_vm_slots_are_a_limit_too() -> None:
    capped = NodeCapacity(physical_cpus=4, memory_bytes=4 * GiB, max_vms=2)
    decision = place(VMRequest("x", 1, MiB), [NodeRecord("n", capped, Allocation(2, 2, 2 * MiB))])
    assert decision.node is None
    assert [v.line() for v in decision.verdicts()] == ["n: VMs: all 2 slots in use"]


def test_an_empty_cluster_says_so() -> None:
    assert place(VMRequest("x", 1, MiB), []).summary() == "no node fits: the cluster has no nodes"


def test_bad_requests_are_refused_with_the_field() -> None:
    with pytest.raises(ValueError, match="policy 'pack' is not one of binpack, spread"):
        VMRequest("x", 1, MiB, policy="pack")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot be negative"):
        VMRequest("x", -1, MiB)


# -- properties --------------------------------------------------------------------------------

capacities = st.builds(
    NodeCapacity,
    physical_cpus=st.integers(1, 16),
    memory_bytes=st.integers(0, 16).map(lambda g: g * GiB),
    max_vms=st.integers(0, 12),
    cpu_overcommit=st.sampled_from([1.0, 1.5, 2.0, 4.0]),
    memory_headroom=st.sampled_from([0.0, 0.2, 0.5]),
)


@st.composite
def clusters(draw: st.DrawFn) -> list[NodeRecord]:
    count = draw(st.integers(0, 6))
    return [
        NodeRecord(
            f"n{i}",
            draw(capacities),
            labels=draw(st.sampled_from([{}, {"zone": "a"}, {"zone": "b"}])),
            cordoned=draw(st.booleans()),
            lost=draw(st.booleans()),
        )
        for i in range(count)
    ]


requests_st = st.builds(
    VMRequest,
    name=st.just("vm"),
    vcpus=st.integers(0, 6),
    memory_bytes=st.integers(0, 4096).map(lambda m: m * MiB),
    selector=st.sampled_from([{}, {"zone": "a"}]),
    anti_affinity=st.sampled_from([None, "web", "db"]),
    policy=st.sampled_from(["binpack", "spread"]),
)


@settings(max_examples=200, deadline=None)
@given(nodes=clusters(), requests=st.lists(requests_st, max_size=30))
def test_placement_never_breaks_a_rule(nodes: list[NodeRecord], requests: list[VMRequest]) -> None:
    decisions, after = place_all(requests, nodes)
    before = {n.name: n for n in nodes}
    for decision in decisions:
        if decision.node is None:
            # refused only when every node really has a reason
            assert all(not v.eligible for v in decision.verdicts())
            continue
        node = before[decision.node]
        assert not node.lost and not node.cordoned
        assert all(node.labels.get(k) == v for k, v in decision.request.selector.items())
        # the fast path agrees with the single-node admission rule
        assert check_fit(node.capacity, node.allocated, decision.request.resources) is None
        group = decision.request.anti_affinity
        assert group is None or node.groups.get(group, 0) == 0
        chosen = [v for v in decision.verdicts() if v.chosen]
        assert [v.node for v in chosen] == [decision.node]
        before[decision.node] = assign(node, decision.request)
    for node in after.values():
        cap, used = node.capacity, node.allocated
        assert used.memory_bytes <= cap.memory_limit_bytes  # memory is never overcommitted
        assert used.vcpus <= cap.vcpu_limit and used.vms <= cap.max_vms
        assert all(count <= 1 for count in node.groups.values())
        if node.lost or node.cordoned:
            assert node.allocated == Allocation()


@settings(max_examples=100, deadline=None)
@given(
    nodes=st.integers(1, 8),
    count=st.integers(0, 60),
    cap=capacities.filter(lambda c: c.max_vms > 0),
    vcpus=st.integers(0, 2),
    memory_mib=st.integers(0, 512),
)
def test_spread_keeps_counts_within_one_where_capacity_allows(
    nodes: int, count: int, cap: NodeCapacity, vcpus: int, memory_mib: int
) -> None:
    pool = [NodeRecord(f"n{i}", cap) for i in range(nodes)]
    request = Request(vcpus, memory_mib * MiB)
    # how many such VMs one node can hold, by the single-node admission rule
    per_node, held = 0, Allocation()
    while per_node < cap.max_vms and check_fit(cap, held, request) is None:
        held = reserve(held, request)
        per_node += 1
    reqs = [VMRequest(f"vm{i}", vcpus, memory_mib * MiB, policy="spread") for i in range(count)]
    decisions, after = place_all(reqs, pool)
    placed = sum(d.node is not None for d in decisions)
    assert placed == min(count, per_node * nodes)
    counts = [n.allocated.vms for n in after.values()]
    assert max(counts) - min(counts) <= 1


@settings(max_examples=100, deadline=None)
@given(nodes=clusters(), requests=st.lists(requests_st, max_size=30))
def test_spread_always_picks_a_node_with_the_fewest_vms(
    nodes: list[NodeRecord], requests: list[VMRequest]
) -> None:
    spread = [
        VMRequest(r.name, r.vcpus, r.memory_bytes, r.selector, r.anti_affinity, "spread")
        for r in requests
    ]
    for decision in place_all(spread, nodes)[0]:
        if decision.node is None:
            continue
        counts = {n.name: n.allocated.vms for n in decision.nodes}
        eligible = [v.node for v in decision.verdicts() if v.eligible]
        assert counts[decision.node] == min(counts[name] for name in eligible)


@settings(max_examples=100, deadline=None)
@given(nodes=clusters(), request=requests_st, seed=st.randoms())
def test_the_answer_does_not_depend_on_node_order(
    nodes: list[NodeRecord], request: VMRequest, seed: object
) -> None:
    shuffled = list(nodes)
    seed.shuffle(shuffled)  # type: ignore[attr-defined]
    assert place(request, nodes).node == place(request, shuffled).node
