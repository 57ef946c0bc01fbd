"""What the cluster network API does: a create-if-absent transaction per name (of two
concurrent creates exactly one wins, the other gets 409), reads from this node's view with
every node's readiness from its ``node-networks/<node>`` report, and a delete that is refused
while a cluster VM's spec names the network. Writes answer 503 when etcd cannot be reached,
as the VM endpoints do.
"""

from __future__ import annotations

from stoker.cluster import keys
from stoker.cluster.errors import unavailable
from stoker.cluster.etcd import Delete, Etcd, EtcdError, Get, unchanged
from stoker.cluster.networks import network_of, node_networks, normal_subnet, not_ready
from stoker.cluster.reads import create_once, require_synced, seen
from stoker.cluster.records import NetworkRecord, NodeNetworksRecord, VMRecord, now_utc
from stoker.cluster.session import NodeSession
from stoker.cluster.view import ClusterView
from stoker.domain import ipam
from stoker.services.errors import Conflict, InvalidSpec, NotFound
from stoker.wire.cluster import (
    ClusterNetworkCreate,
    ClusterNetworkNodeOut,
    ClusterNetworkOut,
    NetworkNodeState,
)


class ClusterNetworkOps:
    def __init__(self, etcd: Etcd, view: ClusterView, session: NodeSession) -> None:
        self.etcd = etcd
        self.view = view
        self.session = session
        self.cfg = session.cfg

    def _readable(self) -> None:
        require_synced(self.view, self.session.last_error)

    def _records(self) -> dict[str, NetworkRecord]:
        return {n: rec for n, (_, rec) in self.view.records(keys.NETWORKS, NetworkRecord).items()}

    # -- writes --------------------------------------------------------------------------------

    async def create(self, spec: ClusterNetworkCreate) -> ClusterNetworkOut:
        """Create-if-absent. The subnet must be private and overlap no other cluster network;
        each node checks it against its own host (interfaces, local networks) when it makes
        its copy, and reports a conflict instead of touching anything."""
        self._readable()
        key = keys.network(spec.name)
        others = {
            f"cluster network {name!r}": rec.spec.subnet
            for name, rec in self._records().items()
            if name != spec.name
        }
        try:
            subnet = ipam.validate_subnet(spec.subnet, others)
        except ipam.SubnetOverlap as exc:
            raise Conflict(str(exc)) from None
        except ipam.IpamError as exc:
            raise InvalidSpec("subnet", str(exc)) from None
        record = NetworkRecord(
            spec=spec.model_copy(update={"subnet": str(subnet)}),
            created_by=self.cfg.node_name,
            created_at=now_utc(),
        )
        what = f"a cluster network named {spec.name!r}"
        await create_once(self.etcd, self.view, key, record, what)
        return self.get(spec.name)

    async def delete(self, name: str) -> None:
        """Refused (409) while any cluster VM's spec names the network; each node deletes its
        copy once no local VM is on it."""
        key = keys.network(_network_name(name))
        self._readable()
        kv = self.view.get(key)
        if kv is None:
            raise NotFound(f"no cluster network named {name!r} (`stoker cluster network list`)")
        users = self.users(name)
        if users:
            raise Conflict(
                f"cluster network {name!r} is in use by {len(users)} cluster VM(s): "
                f"{', '.join(users)}; delete them first"
            )
        try:
            result = await self.etcd.txn(
                [unchanged(key, kv.mod_revision)], [Delete(key)], [Get(key)]
            )
        except EtcdError as exc:
            raise unavailable(exc) from None
        if not result.succeeded:
            if result.got.get(key) is None:
                raise NotFound(f"no cluster network named {name!r} (deleted meanwhile)")
            raise Conflict(f"cluster network {name!r} changed while being deleted; retry")
        await seen(self.view, result.revision)

    # -- reads ---------------------------------------------------------------------------------

    def users(self, name: str) -> list[str]:
        """Cluster VMs whose spec names network ``name``."""
        return sorted(
            vm
            for vm, (_, rec) in self.view.records(keys.VMS, VMRecord).items()
            if network_of(rec.spec) == name
        )

    def all(self) -> list[ClusterNetworkOut]:
        self._readable()
        outs = (self._out(name) for name in self.view.names(keys.NETWORKS))
        return [out for out in outs if out is not None]

    def get(self, name: str) -> ClusterNetworkOut:
        self._readable()
        out = self._out(_network_name(name))
        if out is None:
            raise NotFound(f"no cluster network named {name!r} (`stoker cluster network list`)")
        return out

    def _out(self, name: str) -> ClusterNetworkOut | None:
        kv = self.view.get(keys.network(name))
        record = self.view.record(keys.network(name), NetworkRecord)
        if kv is None or record is None:
            return None
        nodes = [self._node(node, name, kv.create_revision) for node in self.view.names(keys.NODES)]
        spec = record.spec
        return ClusterNetworkOut(
            name=name,
            subnet=normal_subnet(spec.subnet),
            isolation=spec.isolation,
            ipv6=spec.ipv6,
            bridge=spec.bridge,
            uplink=spec.uplink,
            incarnation=kv.create_revision,
            created_by=record.created_by,
            created_at=record.created_at,
            nodes=nodes,
            ready_nodes=sum(1 for n in nodes if n.state == "ready"),
            vms=self.users(name),
            revision=self.view.revision,
        )

    def _node(self, node: str, name: str, incarnation: int) -> ClusterNetworkNodeOut:
        if self.view.get(keys.alive(node)) is None:
            return ClusterNetworkNodeOut(
                node=node, state="lost", reason="its lease expired (node down or cut off)"
            )
        report = self.view.record(node_networks(node), NodeNetworksRecord)
        why = not_ready(report, name, incarnation)
        if why is None:
            return ClusterNetworkNodeOut(node=node, state="ready", reason="its copy matches")
        return ClusterNetworkNodeOut(node=node, state=_state_of(why), reason=why)


def _state_of(why: str) -> NetworkNodeState:
    if why.startswith("conflict"):
        return "conflict"
    if why.startswith(("error", "managed networking")):
        return "error"
    return "pending"


def _network_name(name: str) -> str:
    try:
        return keys.object_name(name, "network")
    except ValueError as exc:
        raise NotFound(f"no cluster network named {name!r}: {exc}") from None
