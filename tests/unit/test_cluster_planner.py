"""The scheduler's plan on hand-made snapshots: new VMs, lost nodes, drains, deletions."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from stoker.cluster.planner import Snapshot, explain, node_records, plan
from stoker.cluster.records import (
    CapacityRecord,
    CordonRecord,
    NodeInfo,
    PlacementRecord,
    PlacementRules,
    VMRecord,
)
from stoker.domain.spec import VMSpec

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
GiB = 1024**3


def node(name: str, max_vms: int = 3, **labels: str) -> NodeInfo:
    return NodeInfo(
        name=name,
        capacity=CapacityRecord(
            physical_cpus=2,
            memory_bytes=4 * GiB,
            max_vms=max_vms,
            cpu_overcommit=4,
            memory_headroom=0.25,
        ),
        labels=labels,
        version="test",
        started_at=NOW,
    )


def vm(name: str, drives: list[dict[str, Any]] | None = None, **rules: Any) -> VMRecord:
    stateless = rules.pop("stateless", None)
    spec = VMSpec.model_validate(
        {"name": name, "kernel": "/k", "memory_mib": 256, "drives": drives or []}
    )
    return VMRecord(
        spec=spec,
        placement=PlacementRules(**rules),
        stateless=stateless,
        created_by="n1",
        created_at=NOW,
    )


def placed(node_name: str | None, incarnation: int, note: str | None = None) -> PlacementRecord:
    return PlacementRecord(
        node=node_name,
        incarnation=incarnation,
        summary="x",
        note=note,
        decided_by="n1",
        decided_at=NOW,
    )


def snap(
    vms: dict[str, VMRecord],
    placements: dict[str, PlacementRecord] | None = None,
    alive: tuple[str, ...] = ("n1", "n2", "n3"),
    cordons: dict[str, CordonRecord] | None = None,
    policy: str = "binpack",
) -> Snapshot:
    return Snapshot(
        nodes={n: node(n, zone="a" if n != "n3" else "b") for n in ("n1", "n2", "n3")},
        alive=frozenset(alive),
        cordons=cordons or {},
        vms={name: (i + 10, record) for i, (name, record) in enumerate(vms.items())},
        placements=placements or {},
        policy="spread" if policy == "spread" else "binpack",
    )


def layout(s: Snapshot) -> dict[str, str | None]:
    return {c.vm: c.placement.node if c.placement else None for c in plan(s, "n1", NOW)}


def test_binpack_fills_the_first_node_then_the_next() -> None:
    vms = {f"b{i}": vm(f"b{i}") for i in range(4)}
    assert layout(snap(vms)) == {"b0": "n1", "b1": "n1", "b2": "n1", "b3": "n2"}


def test_spread_takes_the_node_with_fewest_vms() -> None:
    vms = {f"s{i}": vm(f"s{i}", policy="spread") for i in range(4)}
    assert layout(snap(vms)) == {"s0": "n1", "s1": "n2", "s2": "n3", "s3": "n1"}


def test_the_cluster_policy_applies_when_the_vm_names_none() -> None:
    vms = {f"s{i}": vm(f"s{i}") for i in range(3)}
    assert layout(snap(vms, policy="spread")) == {"s0": "n1", "s1": "n2", "s2": "n3"}


def test_anti_affinity_puts_one_of_a_group_per_node_and_says_when_none_is_left() -> None:
    vms = {f"a{i}": vm(f"a{i}", anti_affinity="web") for i in range(4)}
    changes = {c.vm: c for c in plan(snap(vms), "n1", NOW)}
    assert {n: c.placement.node for n, c in changes.items() if c.placement} == {
        "a0": "n1",
        "a1": "n2",
        "a2": "n3",
        "a3": None,
    }
    assert changes["a3"].why == "no node fits (3 nodes: 3 anti-affinity)"


def test_a_selector_limits_the_nodes() -> None:
    vms = {"z": vm("z", selector={"zone": "b"})}
    assert layout(snap(vms)) == {"z": "n3"}


def test_a_lost_node_s_movable_vms_move_and_the_others_stay_with_a_note() -> None:
    vms = {
        "free": vm("free"),
        "disk": vm("disk", drives=[{"path": "/d.img"}]),
        "pinned": vm("pinned", stateless=False),
        "scratch": vm("scratch", drives=[{"path": "/d.img"}], stateless=True),
    }
    placements = {name: placed("n1", i + 10) for i, name in enumerate(vms)}
    changes = {c.vm: c for c in plan(snap(vms, placements, alive=("n2", "n3")), "n2", NOW)}
    assert changes["free"].placement is not None
    assert changes["free"].placement.node in ("n2", "n3")
    assert changes["free"].placement.previous == "n1"
    assert changes["scratch"].placement is not None
    assert changes["scratch"].placement.node in ("n2", "n3")
    for name in ("disk", "pinned"):
        kept = changes[name].placement
        assert kept is not None and kept.node == "n1"
        assert kept.note is not None and "node n1 is lost" in kept.note
        assert "starts again when n1 returns" in kept.note
    disk = changes["disk"].placement
    assert disk is not None and disk.note is not None
    assert "writable drive /d.img" in disk.note


def test_the_note_goes_once_the_node_is_back() -> None:
    vms = {"pinned": vm("pinned", stateless=False)}
    placements = {"pinned": placed("n1", 10, note="node n1 is lost ...")}
    (change,) = plan(snap(vms, placements), "n1", NOW)
    assert change.placement is not None and change.placement.note is None


def test_a_drain_moves_vms_off_respecting_anti_affinity() -> None:
    vms = {"d1": vm("d1", anti_affinity="g"), "d2": vm("d2", anti_affinity="g")}
    placements = {"d1": placed("n1", 10), "d2": placed("n2", 11)}
    cordons = {"n1": CordonRecord(drain=True, at=NOW)}
    assert layout(snap(vms, placements, cordons=cordons)) == {"d1": "n3"}


def test_a_drain_that_has_nowhere_to_go_keeps_the_vm_and_says_why() -> None:
    vms = {"d1": vm("d1", anti_affinity="g"), "d2": vm("d2", anti_affinity="g")}
    placements = {"d1": placed("n1", 10), "d2": placed("n2", 11)}
    cordons = {"n1": CordonRecord(drain=True, at=NOW), "n3": CordonRecord(at=NOW)}
    (change,) = plan(snap(vms, placements, cordons=cordons), "n1", NOW)
    assert change.placement is not None and change.placement.node == "n1"
    assert change.placement.note == (
        "node n1 is being drained; cannot move: no node fits (3 nodes: 1 anti-affinity, 2 cordoned)"
    )


def test_a_plain_cordon_moves_nothing() -> None:
    vms = {"c": vm("c")}
    placements = {"c": placed("n1", 10)}
    assert plan(snap(vms, placements, cordons={"n1": CordonRecord(at=NOW)}), "n1", NOW) == []


def test_placements_of_deleted_or_recreated_vms_are_replaced() -> None:
    vms = {"again": vm("again")}
    placements = {"gone": placed("n1", 3), "again": placed("n2", 4)}  # older incarnation
    changes = {c.vm: c for c in plan(snap(vms, placements), "n1", NOW)}
    assert changes["gone"].placement is None
    again = changes["again"].placement
    assert again is not None and again.incarnation == 10 and again.node == "n1"


def test_placed_vms_reserve_capacity_whatever_their_desired_state() -> None:
    stopped = vm("stopped").model_copy(update={"desired": "stopped"})
    vms = {"stopped": stopped, "next": vm("next")}
    placements = {"stopped": placed("n1", 10)}
    nodes = node_records(snap(vms, placements))
    assert nodes["n1"].allocated.vms == 1
    assert layout(snap(vms, placements)) == {"next": "n1"}


def test_explain_judges_the_vm_s_own_node_without_its_reservation() -> None:
    vms = {"e": vm("e", anti_affinity="solo")}
    decision = explain(snap(vms, {"e": placed("n2", 10)}), "e")
    verdicts = {v.node: v for v in decision.verdicts()}
    assert verdicts["n2"].eligible  # its own group membership does not count against it
    assert decision.node == "n1"
