"""Which node a VM goes to in cluster mode, and why every other node was not it.

A node is eligible when it is neither lost nor cordoned, matches the VM's label selector,
holds no VM of the VM's anti-affinity group, and has room by the same rules a single node
admits with (``domain/capacity.py``: vCPUs overcommitted by the node's ratio, memory never,
the host's headroom kept free, at most ``max_vms``). Among eligible nodes:

- ``binpack`` (default) picks the node that is fullest after placing the VM (mean of its
  vCPU and memory use), keeping whole nodes free for big VMs and for draining;
- ``spread`` picks the node with the fewest VMs, then the emptiest, so VM counts stay within
  one of each other wherever capacity allows.

Ties go to the node whose name sorts first, so the same inputs always give the same answer.
The hot path allocates nothing per node; the reasons are rebuilt only when asked for.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal

from stoker.domain.capacity import Allocation, NodeCapacity, Request, reserve, shortfalls
from stoker.domain.units import MiB

Policy = Literal["binpack", "spread"]
POLICIES: tuple[Policy, ...] = ("binpack", "spread")

_EMPTY: Mapping[str, str] = MappingProxyType({})
_NO_GROUPS: Mapping[str, int] = MappingProxyType({})


@dataclass(frozen=True)
class NodeRecord:
    """What the scheduler knows of one node: its capacity, what is reserved on it, and the
    facts that rule it out regardless of capacity."""

    name: str
    capacity: NodeCapacity
    allocated: Allocation = field(default_factory=Allocation)
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    cordoned: bool = False
    #: its lease expired: it may be dead or partitioned, either way it gets nothing new
    lost: bool = False
    #: anti-affinity group -> how many VMs of that group the node holds
    groups: Mapping[str, int] = field(default_factory=lambda: _NO_GROUPS)


@dataclass(frozen=True)
class VMRequest:
    """What placement needs to know of one VM."""

    name: str
    vcpus: int
    memory_bytes: int
    #: labels a node must have, all of them, with exactly these values
    selector: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    #: at most one VM of this group per node
    anti_affinity: str | None = None
    policy: Policy = "binpack"

    def __post_init__(self) -> None:
        if self.vcpus < 0 or self.memory_bytes < 0:
            raise ValueError(f"VM {self.name}: vCPUs and memory cannot be negative")
        if self.policy not in POLICIES:
            raise ValueError(
                f"VM {self.name}: placement policy {self.policy!r} is not one of "
                f"{', '.join(POLICIES)}"
            )

    @property
    def resources(self) -> Request:
        return Request(vcpus=self.vcpus, memory_bytes=self.memory_bytes)


@dataclass(frozen=True)
class Verdict:
    node: str
    eligible: bool
    chosen: bool
    #: why not (each rule the node fails), or the score it got
    reasons: tuple[str, ...]
    score: float | None = None

    def line(self) -> str:
        return f"{self.node}: {'; '.join(self.reasons)}"


@dataclass(frozen=True)
class Decision:
    """The chosen node (None: nothing fits) and enough to explain it later."""

    request: VMRequest
    node: str | None
    score: float | None
    nodes: tuple[NodeRecord, ...] = field(repr=False)

    def verdicts(self) -> list[Verdict]:
        """One verdict per node, in name order."""
        return [_verdict(self.request, n, self.node) for n in sorted(self.nodes, key=_name)]

    def explain(self) -> str:
        """Every node and why it was or was not chosen, one line each."""
        head = (
            f"{self.request.name}: placed on {self.node} ({self.request.policy})"
            if self.node is not None
            else f"{self.request.name}: {self.summary()}"
        )
        return "\n".join([head, *(f"  {v.line()}" for v in self.verdicts())])

    def summary(self) -> str:
        """One sentence: where it went, or why no node fits (counted by first reason)."""
        if self.node is not None:
            return f"placed on {self.node}"
        if not self.nodes:
            return "no node fits: the cluster has no nodes"
        counts: dict[str, int] = {}
        for verdict in self.verdicts():
            kind = verdict.reasons[0].split(":", 1)[0]
            counts[kind] = counts.get(kind, 0) + 1
        parts = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
        return f"no node fits ({len(self.nodes)} nodes: {parts})"


def _name(node: NodeRecord) -> str:
    return node.name


# -- choosing ----------------------------------------------------------------------------------


def place(request: VMRequest, nodes: Iterable[NodeRecord]) -> Decision:
    """Choose a node for ``request`` among ``nodes`` (in any order)."""
    pool = tuple(nodes)
    best: NodeRecord | None = None
    best_key: tuple[float, float, str] | None = None
    best_score: float | None = None
    for node in pool:
        if not _eligible(request, node):
            continue
        used = _utilisation_after(request, node)
        if request.policy == "binpack":
            key: tuple[float, float, str] = (-round(used, 9), 0.0, node.name)
        else:
            key = (float(node.allocated.vms), round(used, 9), node.name)
        if best_key is None or key < best_key:
            best, best_key, best_score = node, key, used
    return Decision(request, best.name if best else None, best_score, pool)


def assign(node: NodeRecord, request: VMRequest) -> NodeRecord:
    """The node record after ``request`` is placed on it (reservation and group count).
    Does not check the fit: place() does."""
    groups = dict(node.groups)
    if request.anti_affinity is not None:
        groups[request.anti_affinity] = groups.get(request.anti_affinity, 0) + 1
    return replace(
        node,
        allocated=reserve(node.allocated, request.resources),
        groups=MappingProxyType(groups),
    )


def place_all(
    requests: Iterable[VMRequest], nodes: Iterable[NodeRecord]
) -> tuple[list[Decision], dict[str, NodeRecord]]:
    """Place requests one after another, each seeing the ones before it."""
    by_name = {n.name: n for n in nodes}
    decisions = []
    for request in requests:
        decision = place(request, by_name.values())
        if decision.node is not None:
            by_name[decision.node] = assign(by_name[decision.node], request)
        decisions.append(decision)
    return decisions, by_name


def _eligible(request: VMRequest, node: NodeRecord) -> bool:
    if node.lost or node.cordoned:
        return False
    labels = node.labels
    for key, value in request.selector.items():
        if labels.get(key) != value:
            return False
    if request.anti_affinity is not None and node.groups.get(request.anti_affinity, 0) > 0:
        return False
    cap, used = node.capacity, node.allocated
    return (
        used.vms + 1 <= cap.max_vms
        and used.vcpus + request.vcpus <= cap.vcpu_limit
        and used.memory_bytes + request.memory_bytes <= cap.memory_limit_bytes
    )


def _utilisation_after(request: VMRequest, node: NodeRecord) -> float:
    """Mean of the vCPU and memory fractions in use once the VM is there (0..1)."""
    cap, used = node.capacity, node.allocated
    cpu_limit, mem_limit = cap.vcpu_limit, cap.memory_limit_bytes
    cpu = (used.vcpus + request.vcpus) / cpu_limit if cpu_limit else 1.0
    mem = (used.memory_bytes + request.memory_bytes) / mem_limit if mem_limit else 1.0
    return (cpu + mem) / 2


# -- explaining --------------------------------------------------------------------------------


def _verdict(request: VMRequest, node: NodeRecord, chosen: str | None) -> Verdict:
    reasons = _problems(request, node)
    if reasons:
        return Verdict(node.name, eligible=False, chosen=False, reasons=tuple(reasons))
    used = _utilisation_after(request, node)
    score = _score_text(request, node, used)
    if node.name == chosen:
        return Verdict(node.name, True, True, (f"chosen: {score}",), used)
    return Verdict(node.name, True, False, (f"fits, not chosen: {score}",), used)


def _score_text(request: VMRequest, node: NodeRecord, used: float) -> str:
    if request.policy == "binpack":
        return f"binpack score {used:.3f} (vCPU and memory use after placing; highest wins)"
    vms = node.allocated.vms
    return (
        f"spread: {vms} VM{'' if vms == 1 else 's'} here, use after placing {used:.3f} "
        "(fewest VMs wins, then lowest use)"
    )


def _problems(request: VMRequest, node: NodeRecord) -> list[str]:
    """Every rule the node fails for this request, in the order an operator fixes them."""
    if node.lost:
        return ["lost: its lease expired (node down or cut off from etcd)"]
    out: list[str] = []
    if node.cordoned:
        out.append("cordoned")
    for key, value in sorted(request.selector.items()):
        have = node.labels.get(key)
        if have != value:
            got = f"node has {key}={have}" if have is not None else f"node has no label {key}"
            out.append(f"selector {key}={value}: {got}")
    group = request.anti_affinity
    if group is not None and node.groups.get(group, 0) > 0:
        out.append(f"anti-affinity: group {group} already on this node")
    for short in shortfalls(node.capacity, node.allocated, request.resources):
        if short.resource == "memory":
            out.append(
                f"memory: needs {_mib(short.requested)}, {_mib(short.available)} free "
                f"of {_mib(short.limit)} ({short.detail})"
            )
        elif short.resource == "vcpus":
            out.append(
                f"vCPUs: needs {short.requested}, {short.available} free of {short.limit} "
                f"({short.detail})"
            )
        else:
            out.append(f"VMs: all {short.limit} slots in use")
    return out


def _mib(n: int) -> str:
    whole, rest = divmod(n, MiB)
    return f"{whole} MiB" if not rest else f"{n / MiB:.1f} MiB"
