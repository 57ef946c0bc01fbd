"""Cluster networks, the pure part: what a node does about each cluster network, and whether
a node can take a VM on one (no etcd, no host, no clock: the runner and the planner gather
the facts, these functions decide).

A cluster network is a definition in etcd (``networks/<name>``). Every node makes a local
network of the same name and definition, marked ``managed_by = "cluster"``. Two rules keep a
node from ever harming what is not the cluster's:

- a local network of that name that the cluster does not manage, or whose definition
  differs, is never touched: it is a conflict, reported, and the node is not used for VMs on
  that network;
- a cluster-managed copy whose network left the cluster is deleted only once no local VM
  is on it, and only while etcd answers (the runner says so in ``may_delete``).

Addresses are per node: each node's bridge is its own segment with its own DHCP and NAT.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from stoker.cluster import keys
from stoker.cluster.records import NodeNetworksRecord
from stoker.domain.networks import NetworkRecord as LocalNetwork
from stoker.domain.networks import NetworkSpec
from stoker.domain.spec import NetworkMode, VMSpec

#: ``managed_by`` of a node's local copy of a cluster network
CLUSTER_MANAGER = "cluster"
#: ``node-networks/<node>``: the cluster networks ready on each node (see records)
NODE_NETWORKS = keys.ROOT + "node-networks/"


def node_networks(node: str) -> str:
    """The key of ``node``'s report on its cluster networks."""
    return NODE_NETWORKS + keys.node_name(node)


def network_of(spec: VMSpec) -> str | None:
    """The managed network a VM spec names, or None (user-mode, TAP, none). Placement
    filters on it only when it is a cluster network."""
    if spec.network.mode != NetworkMode.MANAGED:
        return None
    return spec.network.name


@dataclass(frozen=True)
class Wanted:
    """One cluster network: its definition and the create revision that identifies it."""

    name: str
    incarnation: int
    spec: NetworkSpec


def normal_subnet(subnet: str) -> str:
    """``10.1.0.0/24`` for any spelling of it (as the local create stores it)."""
    try:
        return str(ipaddress.ip_network(subnet, strict=False))
    except ValueError:
        return subnet


def difference(spec: NetworkSpec, local: LocalNetwork) -> str | None:
    """How a local network differs from the cluster's definition, or None when it matches
    (the bridge and uplink only when the definition names them)."""
    found = []
    if local.subnet != normal_subnet(spec.subnet):
        found.append(f"subnet {local.subnet} here, {normal_subnet(spec.subnet)} in the cluster")
    if local.isolation != spec.isolation:
        here, there = local.isolation.value, spec.isolation.value
        found.append(f"isolation {here} here, {there} in the cluster")
    if (local.ipv6_subnet is not None) != spec.ipv6:
        found.append(f"ipv6 {local.ipv6_subnet is not None} here, {spec.ipv6} in the cluster")
    if spec.bridge is not None and local.bridge != spec.bridge:
        found.append(f"bridge {local.bridge} here, {spec.bridge} in the cluster")
    if local.uplink != spec.uplink:
        found.append(f"uplink {local.uplink} here, {spec.uplink} in the cluster")
    return "; ".join(found) or None


def conflict(spec: NetworkSpec, local: LocalNetwork) -> str | None:
    """Why the local network of this name cannot serve as the cluster network, or None."""
    if local.managed_by != CLUSTER_MANAGER:
        return (
            f"conflict: a local network {local.name!r} ({local.subnet}, made by "
            f"{local.managed_by}) exists on this node and the cluster does not manage it; it is "
            "left alone: delete or rename it here (`stoker network delete`) for the cluster's "
            "to be made"
        )
    differs = difference(spec, local)
    if differs is not None:
        return (
            f"conflict: this node's copy of {local.name!r} differs from the cluster's ({differs});"
            " it is left alone: delete it here once no VM uses it, and the node makes it again"
        )
    return None


@dataclass(frozen=True)
class NetworkPlan:
    """What a node does now, and what it reports."""

    create: tuple[Wanted, ...] = ()
    delete: tuple[str, ...] = ()
    #: name -> incarnation: cluster networks whose local copy matches
    ready: Mapping[str, int] = field(default_factory=dict)
    #: name -> why it is not ready here
    problems: Mapping[str, str] = field(default_factory=dict)
    #: cluster-managed copies that left the cluster but stay for now, and why
    kept: Mapping[str, str] = field(default_factory=dict)


def plan_networks(
    wanted: Mapping[str, Wanted],
    local: Sequence[LocalNetwork],
    users: Mapping[str, Sequence[str]],
    *,
    may_delete: bool,
    unavailable: str | None = None,
    failed: Mapping[str, str] | None = None,
) -> NetworkPlan:
    """The node's next steps for its cluster networks.

    ``users``: local network name -> the local VMs on it. ``may_delete``: etcd answers now
    (the view is current), so a network missing from it really left the cluster.
    ``unavailable``: why this node cannot make managed networks at all (None: it can).
    ``failed``: name -> why the last create failed, for networks still backing off.
    """
    failed = failed or {}
    by_name = {net.name: net for net in local}
    create: list[Wanted] = []
    ready: dict[str, int] = {}
    problems: dict[str, str] = {}
    for name, want in sorted(wanted.items()):
        have = by_name.get(name)
        if have is not None:
            why = conflict(want.spec, have)
            if why is None:
                ready[name] = want.incarnation
            else:
                problems[name] = why
        elif unavailable is not None:
            problems[name] = f"managed networking is not available on this node: {unavailable}"
        elif name in failed:
            problems[name] = f"error: could not make it here: {failed[name]}"
        else:
            create.append(want)
            problems[name] = "pending: being made on this node"
    delete: list[str] = []
    kept: dict[str, str] = {}
    for net in sorted(local, key=lambda n: n.name):
        if net.managed_by != CLUSTER_MANAGER or net.name in wanted:
            continue
        on_it = sorted(users.get(net.name, ()))
        if on_it:
            kept[net.name] = f"left the cluster; kept while VMs use it: {', '.join(on_it)}"
        elif not may_delete:
            kept[net.name] = "left the cluster as last seen; kept until etcd answers again"
        else:
            delete.append(net.name)
    return NetworkPlan(tuple(create), tuple(delete), ready, problems, kept)


def not_ready(report: NodeNetworksRecord | None, name: str, incarnation: int) -> str | None:
    """Why a node cannot take a VM on cluster network ``name`` (None: it can), from its
    report. Used by the scheduler's placement filter and by the API."""
    if report is None:
        return "the node has not reported its cluster networks yet"
    have = report.ready.get(name)
    if have == incarnation:
        return None
    problem = report.problems.get(name)
    if problem is not None:
        return problem
    if have is not None:
        return "its copy is of an older definition of this name"
    return "not set up yet"
