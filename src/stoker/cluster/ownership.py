"""The start guard of cluster VMs: a node starts one only while it owns it under its live
lease. Handed to the lifecycle as a ``StartGuard``, so every path that starts a VM (the
reconciler, an operator's local ``vm start``, the restart policy after an error) passes it.
"""

from __future__ import annotations

from stoker.cluster import keys
from stoker.cluster.records import CLUSTER_LABEL, OwnerRecord
from stoker.cluster.session import NodeSession
from stoker.cluster.view import ClusterView
from stoker.domain.vm import VM
from stoker.services.errors import StartVeto


def incarnation_of(vm: VM) -> int | None:
    """The cluster incarnation a local VM's label carries; None: not a cluster VM."""
    raw = vm.spec.labels.get(CLUSTER_LABEL)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        return -1  # a cluster label nobody can own: the guard refuses it


class Ownership:
    def __init__(self, session: NodeSession, view: ClusterView) -> None:
        self.session = session
        self.view = view
        #: name -> (lease, incarnation) taken by this node's own transaction, known before
        #: the view has caught up with it
        self._taken: dict[str, tuple[int, int]] = {}

    def took(self, name: str, lease: int, incarnation: int) -> None:
        self._taken[name] = (lease, incarnation)

    def released(self, name: str) -> None:
        self._taken.pop(name, None)

    def owns(self, name: str, incarnation: int) -> bool:
        lease = self.session.lease_id
        if lease is None:
            return False
        if self._taken.get(name) == (lease, incarnation):
            return True
        owner = self.view.record(keys.owner(name), OwnerRecord)
        return (
            owner is not None
            and owner.node == self.session.cfg.node_name
            and owner.lease == lease
            and owner.incarnation == incarnation
        )

    async def before_start(self, vm: VM) -> None:
        incarnation = incarnation_of(vm)
        if incarnation is None:
            return
        if not self.session.may_run():
            raise StartVeto(
                f"cluster VM {vm.name}: this node's etcd lease is {self.session.standing()}, "
                "so it may not start cluster VMs until a renewal gets through"
            )
        if not self.owns(vm.name, incarnation):
            raise StartVeto(
                f"cluster VM {vm.name}: this node does not hold its owner record; it starts "
                "only where the cluster placed it (`stoker cluster vm show`)"
            )
