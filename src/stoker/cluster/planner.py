"""What the scheduler writes, given one snapshot of the cluster (pure: no etcd, no clock).

For every VM, in creation order so that a layout never depends on key order:

- no placement yet (or nothing fitted last time): place it by ``domain.placement``;
- placed on a node that is **lost** (its lease expired) or **being drained**: place it again
  elsewhere if it may move (``records.movable``), else leave it and say why in ``note``;
- placed on a healthy node: nothing, except clearing a note that no longer applies.

Placements of VMs that no longer exist are deleted. Every placed VM reserves its vCPUs and
memory on its node whatever its desired state, so a stopped VM can always start where it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime

from stoker.cluster.networks import network_of, not_ready
from stoker.cluster.records import (
    CordonRecord,
    NodeInfo,
    NodeNetworksRecord,
    PlacementRecord,
    Policy,
    VMRecord,
    movable,
)
from stoker.domain.capacity import Allocation, release
from stoker.domain.placement import Decision, NodeRecord, Verdict, VMRequest, assign, place
from stoker.domain.units import MiB


@dataclass(frozen=True)
class Snapshot:
    """The cluster as the scheduler sees it at one revision."""

    nodes: Mapping[str, NodeInfo]
    alive: frozenset[str]
    cordons: Mapping[str, CordonRecord]
    #: name -> (incarnation, record)
    vms: Mapping[str, tuple[int, VMRecord]]
    placements: Mapping[str, PlacementRecord]
    policy: Policy = "binpack"
    #: cluster network name -> its create revision (docs/cluster.md, "Cluster networks")
    networks: Mapping[str, int] = field(default_factory=dict)
    #: node -> its report of the cluster networks ready there
    node_networks: Mapping[str, NodeNetworksRecord] = field(default_factory=dict)


@dataclass(frozen=True)
class Change:
    vm: str
    #: None: delete the placement
    placement: PlacementRecord | None
    why: str


def request_of(name: str, record: VMRecord, default_policy: Policy) -> VMRequest:
    rules = record.placement
    return VMRequest(
        name=name,
        vcpus=record.spec.vcpus,
        memory_bytes=record.spec.memory_mib * MiB,
        selector=rules.selector,
        anti_affinity=rules.anti_affinity,
        policy=rules.policy or default_policy,
    )


def node_records(snap: Snapshot) -> dict[str, NodeRecord]:
    """Every registered node with what its current placements reserve on it."""
    nodes = {
        name: NodeRecord(
            name=name,
            capacity=info.capacity.capacity(),
            labels=info.labels,
            cordoned=name in snap.cordons,
            lost=name not in snap.alive,
        )
        for name, info in snap.nodes.items()
    }
    for name, (incarnation, record) in sorted(snap.vms.items(), key=lambda item: item[1][0]):
        placed = snap.placements.get(name)
        if placed is None or placed.incarnation != incarnation or placed.node not in nodes:
            continue
        nodes[placed.node] = assign(nodes[placed.node], request_of(name, record, snap.policy))
    return nodes


def unassign(node: NodeRecord, request: VMRequest) -> NodeRecord:
    groups = dict(node.groups)
    if request.anti_affinity is not None and groups.get(request.anti_affinity, 0) > 0:
        groups[request.anti_affinity] -= 1
    try:
        allocated = release(node.allocated, request.resources)
    except ValueError:
        allocated = Allocation()
    return replace(node, allocated=allocated, groups=groups)


@dataclass(frozen=True)
class NetworkDecision(Decision):
    """A decision among the nodes where the VM's cluster network is ready; every other node
    is judged too, with why the network rules it out first."""

    network: str = ""
    #: node -> why the network is not ready there
    blocked: Mapping[str, str] = field(default_factory=dict)

    def verdicts(self) -> list[Verdict]:
        out = []
        for verdict in super().verdicts():
            why = self.blocked.get(verdict.node)
            if why is None:
                out.append(verdict)
                continue
            rest = tuple(r for r in verdict.reasons if not r.startswith(("chosen", "fits")))
            first = f"network {self.network} not ready here: {why}"
            out.append(Verdict(verdict.node, False, False, (first, *rest)))
        return out


def choose(
    snap: Snapshot, record: VMRecord, request: VMRequest, nodes: Iterable[NodeRecord]
) -> Decision:
    """``place``, among only the nodes that report the VM's cluster network ready (at its
    current revision) when its spec names one; a network that is not a cluster network
    (the node's default, a node's own) does not filter."""
    pool = tuple(nodes)
    network = network_of(record.spec)
    incarnation = snap.networks.get(network) if network is not None else None
    if network is None or incarnation is None:
        return place(request, pool)
    blocked = {}
    for node in pool:
        why = not_ready(snap.node_networks.get(node.name), network, incarnation)
        if why is not None and not node.lost:
            blocked[node.name] = why
    inner = place(request, [n for n in pool if n.name not in blocked])
    return NetworkDecision(request, inner.node, inner.score, pool, network, blocked)


def explain(snap: Snapshot, name: str) -> Decision:
    """Where ``name`` would go now, with every node's verdict (its own reservation removed
    from its current node first, so that node is judged as if the VM were not there)."""
    incarnation, record = snap.vms[name]
    request = request_of(name, record, snap.policy)
    nodes = node_records(snap)
    placed = snap.placements.get(name)
    if placed is not None and placed.incarnation == incarnation and placed.node in nodes:
        nodes[placed.node] = unassign(nodes[placed.node], request)
    return choose(snap, record, request, nodes.values())


@dataclass
class _Plan:
    snap: Snapshot
    leader: str
    now: datetime
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    changes: list[Change] = field(default_factory=list)

    def record(
        self,
        vm: str,
        incarnation: int,
        node: str | None,
        summary: str,
        note: str | None = None,
        previous: str | None = None,
    ) -> PlacementRecord:
        return PlacementRecord(
            node=node,
            incarnation=incarnation,
            summary=summary[:2000],
            note=note[:2000] if note else None,
            previous=previous,
            decided_by=self.leader,
            decided_at=self.now,
        )


def plan(snap: Snapshot, leader: str, now: datetime) -> list[Change]:
    """The placement writes that bring the snapshot to the rules above."""
    work = _Plan(snap, leader, now, node_records(snap))
    for name, (incarnation, record) in sorted(snap.vms.items(), key=lambda item: item[1][0]):
        current = snap.placements.get(name)
        if current is not None and current.incarnation != incarnation:
            current = None
        request = request_of(name, record, snap.policy)
        if current is None or current.node is None:
            _place_new(work, name, incarnation, request, current)
        else:
            _check_placed(work, name, incarnation, record, request, current)
    for name in sorted(set(snap.placements) - set(snap.vms)):
        work.changes.append(Change(name, None, "its VM was deleted"))
    return work.changes


def _place_new(
    work: _Plan,
    name: str,
    incarnation: int,
    request: VMRequest,
    current: PlacementRecord | None,
) -> None:
    decision = choose(work.snap, work.snap.vms[name][1], request, work.nodes.values())
    if decision.node is not None:
        work.nodes[decision.node] = assign(work.nodes[decision.node], request)
        summary = f"placed on {decision.node} ({request.policy})"
        work.changes.append(
            Change(name, work.record(name, incarnation, decision.node, summary), summary)
        )
        return
    summary = decision.summary()
    if current is None or current.summary != summary:
        work.changes.append(Change(name, work.record(name, incarnation, None, summary), summary))


def _trouble(snap: Snapshot, node: str) -> str | None:
    """Why VMs must leave ``node``, or None when it is healthy."""
    if node not in snap.nodes or node not in snap.alive:
        return f"node {node} is lost (its lease expired: down or cut off from etcd)"
    cordon = snap.cordons.get(node)
    if cordon is not None and cordon.drain:
        return f"node {node} is being drained"
    return None


def _check_placed(
    work: _Plan,
    name: str,
    incarnation: int,
    record: VMRecord,
    request: VMRequest,
    current: PlacementRecord,
) -> None:
    node = current.node
    assert node is not None
    trouble = _trouble(work.snap, node)
    if trouble is None:
        if current.note is not None:
            work.changes.append(
                Change(name, current.model_copy(update={"note": None}), f"{node} is back")
            )
        return
    may_move, why = movable(record)
    if not may_move:
        note = f"{trouble}; not moved: {why}"
        if "lost" in trouble:
            note += f"; it starts again when {node} returns"
        if current.note != note:
            work.changes.append(Change(name, current.model_copy(update={"note": note}), note))
        return
    if node in work.nodes:
        work.nodes[node] = unassign(work.nodes[node], request)
    decision = choose(work.snap, record, request, work.nodes.values())
    if decision.node is None:
        note = f"{trouble}; cannot move: {decision.summary()}"
        if node in work.nodes:
            work.nodes[node] = assign(work.nodes[node], request)
        if current.note != note:
            work.changes.append(Change(name, current.model_copy(update={"note": note}), note))
        return
    work.nodes[decision.node] = assign(work.nodes[decision.node], request)
    summary = f"moved from {node} to {decision.node}: {trouble} ({request.policy})"
    work.changes.append(
        Change(
            name,
            work.record(name, incarnation, decision.node, summary, previous=node),
            summary,
        )
    )
