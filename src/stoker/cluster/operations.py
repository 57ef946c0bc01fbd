"""What the cluster API does: writes go to etcd as transactions (503 when it cannot be
reached), reads come from this node's view of the cluster (one consistent revision, named in
the answers). After a write the answer waits, briefly, for the view to show it, so a client
reads its own writes from the same node.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_right
from collections.abc import Callable

from stoker import __version__
from stoker.cluster import keys
from stoker.cluster.errors import unavailable
from stoker.cluster.etcd import Condition, Delete, Etcd, EtcdError, Get
from stoker.cluster.planner import explain, node_records, request_of
from stoker.cluster.reads import create_once, require_synced, seen
from stoker.cluster.records import (
    CordonRecord,
    NodeInfo,
    OwnerRecord,
    PlacementRecord,
    StatusRecord,
    VMRecord,
    load,
    movable,
    now_utc,
)
from stoker.cluster.scheduler import ClusterScheduler, snapshot
from stoker.cluster.session import NodeSession
from stoker.cluster.view import ClusterView
from stoker.domain.units import MiB
from stoker.services.errors import Conflict, NotFound
from stoker.wire.cluster import (
    AllocatedView,
    CapacityView,
    ClusterOut,
    ClusterVMCreate,
    ClusterVMOut,
    ClusterVMPage,
    ClusterVMSummary,
    ExplainOut,
    NodeOut,
    NodeState,
    VerdictOut,
)

MAX_PAGE = 500


class ClusterOps:
    def __init__(
        self,
        etcd: Etcd,
        view: ClusterView,
        session: NodeSession,
        scheduler: ClusterScheduler,
        version: str = __version__,
    ) -> None:
        self.etcd = etcd
        self.view = view
        self.session = session
        self.scheduler = scheduler
        self.cfg = session.cfg
        self.version = version

    # -- plumbing ------------------------------------------------------------------------------

    def _readable(self) -> None:
        require_synced(self.view, self.session.last_error)

    async def _seen(self, revision: int) -> None:
        await seen(self.view, revision)

    def _node_state(self, name: str | None) -> NodeState | None:
        if name is None:
            return None
        if self.view.get(keys.alive(name)) is None:
            return "lost"
        cordon = self.view.record(keys.cordoned(name), CordonRecord)
        if cordon is None:
            return "ready"
        return "draining" if cordon.drain else "cordoned"

    # -- the cluster and its nodes -------------------------------------------------------------

    def summary(self) -> ClusterOut:
        nodes = self.view.names(keys.NODES)
        lost = [n for n in nodes if self.view.get(keys.alive(n)) is None]
        lease = self.session.lease_id
        return ClusterOut(
            node=self.cfg.node_name,
            standing=self.session.standing().value,
            registered=self.session.registered,
            lease=f"{lease:x}" if lease else None,
            fence_remaining_s=round(self.session.remaining(), 3),
            endpoints=list(self.cfg.endpoints),
            last_error=self.session.last_error,
            conflict=self.session.conflict,
            leader=self.scheduler.current_leader(),
            revision=self.view.revision,
            nodes=len(nodes),
            nodes_lost=len(lost),
            vms=len(self.view.names(keys.VMS)),
        )

    def nodes(self) -> list[NodeOut]:
        self._readable()
        return [self._node_out(name) for name in self.view.names(keys.NODES)]

    def node(self, name: str) -> NodeOut:
        self._readable()
        if self.view.record(keys.node(_node_name(name)), NodeInfo) is None:
            raise NotFound(f"no node named {name!r} in the cluster (`stoker node list`)")
        return self._node_out(name)

    def _node_out(self, name: str) -> NodeOut:
        snap = snapshot(self.view, self.cfg.policy)
        info = snap.nodes[name]
        record = node_records(snap)[name]
        cap = record.capacity
        placed = sorted(
            vm for vm, p in snap.placements.items() if p.node == name and vm in snap.vms
        )
        cordon = snap.cordons.get(name)
        state = self._node_state(name)
        assert state is not None
        return NodeOut(
            name=name,
            state=state,
            address=info.address,
            labels=dict(info.labels),
            capacity=CapacityView(
                physical_cpus=cap.physical_cpus,
                memory_mib=cap.memory_bytes // MiB,
                max_vms=cap.max_vms,
                cpu_overcommit=cap.cpu_overcommit,
                memory_headroom=cap.memory_headroom,
                vcpu_limit=cap.vcpu_limit,
                memory_limit_mib=cap.memory_limit_bytes // MiB,
            ),
            allocated=AllocatedView(
                vms=record.allocated.vms,
                vcpus=record.allocated.vcpus,
                memory_mib=record.allocated.memory_bytes // MiB,
            ),
            vms=placed,
            cordon_reason=cordon.reason if cordon is not None else None,
            scheduler=self.scheduler.current_leader() == name,
            version=info.version,
            started_at=info.started_at,
        )

    async def cordon(self, name: str, reason: str, drain: bool) -> NodeOut:
        self.node(name)
        record = CordonRecord(drain=drain, reason=reason, at=now_utc())
        try:
            revision = await self.etcd.put(keys.cordoned(name), record.dump())
        except EtcdError as exc:
            raise unavailable(exc) from None
        await self._seen(revision)
        return self._node_out(name)

    async def uncordon(self, name: str) -> NodeOut:
        self.node(name)
        try:
            result = await self.etcd.txn([], [Delete(keys.cordoned(name))])
        except EtcdError as exc:
            raise unavailable(exc) from None
        await self._seen(result.revision)
        return self._node_out(name)

    # -- cluster VMs ---------------------------------------------------------------------------

    async def create(self, request: ClusterVMCreate, wait_s: float = 0.0) -> ClusterVMOut:
        """Create-if-absent: of two concurrent creates of one name, on any nodes, exactly
        one succeeds; the other gets 409 naming who created it."""
        name = request.spec.name
        record = VMRecord(
            spec=request.spec,
            desired="running" if request.start else "stopped",
            placement=request.placement,
            stateless=request.stateless,
            created_by=self.cfg.node_name,
            created_at=now_utc(),
        )
        what = f"a cluster VM named {name!r}"
        await create_once(self.etcd, self.view, keys.vm(name), record, what)
        if wait_s > 0:
            await self._wait_for(lambda: self._placement(name) is not None, wait_s)
        return self.get(name)

    def _placement(self, name: str) -> PlacementRecord | None:
        return self.view.record(keys.placement(name), PlacementRecord)

    async def _wait_for(self, ready: Callable[[], bool], timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        version = self.view.version
        while not ready() and loop.time() < deadline:
            version = await self.view.wait_changed(version, deadline - loop.time())

    def page(self, limit: int = MAX_PAGE, after: str | None = None) -> ClusterVMPage:
        self._readable()
        names = self.view.names(keys.VMS)
        first = bisect_right(names, after) if after is not None else 0
        chosen = names[first : first + max(1, min(limit, MAX_PAGE))]
        items = [self._summary(name) for name in chosen]
        more = first + len(chosen) < len(names)
        return ClusterVMPage(
            items=[i for i in items if i is not None],
            next_after=chosen[-1] if more and chosen else None,
            total=len(names),
            revision=self.view.revision,
        )

    def get(self, name: str) -> ClusterVMOut:
        self._readable()
        out = self._vm_out(_vm_name(name))
        if out is None:
            raise NotFound(f"no cluster VM named {name!r} (`stoker cluster vm list`)")
        return out

    def _summary(self, name: str) -> ClusterVMSummary | None:
        out = self._vm_out(name)
        return ClusterVMSummary.model_validate(out.model_dump()) if out else None

    def _vm_out(self, name: str) -> ClusterVMOut | None:
        kv = self.view.get(keys.vm(name))
        record = self.view.record(keys.vm(name), VMRecord)
        if kv is None or record is None:
            return None
        incarnation = kv.create_revision
        placement = self._placement(name)
        if placement is not None and placement.incarnation != incarnation:
            placement = None
        owner = self.view.record(keys.owner(name), OwnerRecord)
        status = self.view.record(keys.status(name), StatusRecord)
        node = placement.node if placement is not None else None
        node_state = self._node_state(node)
        since = None
        if node is None:
            state = "unplaced"
            reason = placement.summary if placement is not None else "waiting for the scheduler"
        elif status is not None and status.incarnation == incarnation and status.node == node:
            state, reason, since = status.state.value, status.reason, status.since
            if node_state == "lost":
                state = "unknown"
                reason = f"node {node} is lost; it last reported {status.state.value}: {reason}"
        elif node_state == "lost":
            state, reason = "unknown", f"node {node} is lost and never reported on it"
        else:
            state, reason = "pending", f"placed on {node}; waiting for it to report"
        may_move, why = movable(record)
        return ClusterVMOut(
            name=name,
            desired=record.desired,
            node=node,
            state=state,
            reason=reason,
            note=placement.note if placement is not None else None,
            vcpus=record.spec.vcpus,
            memory_mib=record.spec.memory_mib,
            incarnation=incarnation,
            spec=record.spec,
            placement=record.placement,
            stateless=record.stateless,
            movable=may_move,
            movable_reason=why,
            node_state=node_state,
            owner=owner.node if owner is not None and owner.incarnation == incarnation else None,
            since=since,
            placement_summary=placement.summary if placement is not None else None,
            previous_node=placement.previous if placement is not None else None,
            created_by=record.created_by,
            created_at=record.created_at,
        )

    async def set_desired(self, name: str, desired: str) -> ClusterVMOut:
        """Compare-and-swap on the record's revision, retried a few times on a race."""
        key = keys.vm(_vm_name(name))
        try:
            for _ in range(5):
                kv = await self.etcd.get(key)
                record = load(VMRecord, kv.value, key) if kv is not None else None
                if kv is None or record is None:
                    raise NotFound(f"no cluster VM named {name!r} (`stoker cluster vm list`)")
                if record.desired == desired:
                    await self._seen(kv.mod_revision)
                    return self.get(name)
                updated = record.model_copy(update={"desired": desired})
                result = await self.etcd.replace(key, updated.dump(), mod_revision=kv.mod_revision)
                if result.succeeded:
                    await self._seen(result.revision)
                    return self.get(name)
        except EtcdError as exc:
            raise unavailable(exc) from None
        raise Conflict(f"cluster VM {name!r} kept changing while being updated; retry")

    async def delete(self, name: str) -> None:
        """Delete the record, its placement and status in one transaction. The owner record
        is left to its node, which deletes it once the VM is stopped there: until then no
        new VM of this name can start anywhere."""
        key = keys.vm(_vm_name(name))
        try:
            result = await self.etcd.txn(
                [Condition(key, "create", ">", 0)],
                [Delete(key), Delete(keys.placement(name)), Delete(keys.status(name))],
                [Get(key)],
            )
        except EtcdError as exc:
            raise unavailable(exc) from None
        if not result.succeeded:
            raise NotFound(f"no cluster VM named {name!r} (`stoker cluster vm list`)")
        await self._seen(result.revision)

    def explain(self, name: str) -> ExplainOut:
        self._readable()
        snap = snapshot(self.view, self.cfg.policy)
        if _vm_name(name) not in snap.vms:
            raise NotFound(f"no cluster VM named {name!r} (`stoker cluster vm list`)")
        incarnation, record = snap.vms[name]
        decision = explain(snap, name)
        placement = snap.placements.get(name)
        if placement is not None and placement.incarnation != incarnation:
            placement = None
        current = placement.node if placement is not None else None
        verdicts = decision.verdicts()
        lines = [
            f"{name}: placed on {current}" if current else f"{name}: not placed",
            f"  now it would go to {decision.node or 'no node'} "
            f"({request_of(name, record, snap.policy).policy}): {decision.summary()}",
        ]
        if placement is not None and placement.note:
            lines.append(f"  note: {placement.note}")
        lines += [f"  {v.line()}" for v in verdicts]
        return ExplainOut(
            vm=name,
            placed_on=current,
            would_place_on=decision.node,
            policy=decision.request.policy,
            summary=decision.summary(),
            note=placement.note if placement is not None else None,
            verdicts=[
                VerdictOut(
                    node=v.node,
                    eligible=v.eligible,
                    chosen=v.chosen,
                    reasons=list(v.reasons),
                    score=v.score,
                )
                for v in verdicts
            ],
            text="\n".join(lines),
        )


def _vm_name(name: str) -> str:
    try:
        return keys.object_name(name, "VM")
    except ValueError as exc:
        raise NotFound(f"no cluster VM named {name!r}: {exc}") from None


def _node_name(name: str) -> str:
    try:
        return keys.node_name(name)
    except ValueError as exc:
        raise NotFound(str(exc)) from None
