"""The one active scheduler: every agent campaigns (etcd's election recipe, on its node
lease); the leader plans placements on its view of the cluster and writes them.

Each write is a transaction on two conditions: this candidate's election key is still the one
it created (so a scheduler whose lease expired cannot write) and the placement is still the
one the plan read. After writing, the next pass waits until the view shows those writes, so
no pass plans on reservations it cannot see.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from stoker.cluster import keys
from stoker.cluster.election import Election
from stoker.cluster.etcd import Delete, Etcd, EtcdError, LeaseNotFound, Put, absent, unchanged
from stoker.cluster.networks import NODE_NETWORKS
from stoker.cluster.planner import Change, Snapshot, plan
from stoker.cluster.records import (
    CandidateRecord,
    CordonRecord,
    NetworkRecord,
    NodeInfo,
    NodeNetworksRecord,
    PlacementRecord,
    VMRecord,
)
from stoker.cluster.session import NodeSession
from stoker.cluster.view import ClusterView
from stoker.services.loops import cancel

log = logging.getLogger("stoker.cluster")

PASS_EVERY_S = 1.0


def snapshot(view: ClusterView, policy: str) -> Snapshot:
    """The planner's input, read from the view at its current revision."""
    return Snapshot(
        nodes={n: rec for n, (_, rec) in view.records(keys.NODES, NodeInfo).items()},
        alive=frozenset(view.names(keys.ALIVE)),
        cordons={n: rec for n, (_, rec) in view.records(keys.CORDONED, CordonRecord).items()},
        vms={
            n: (kv.create_revision, rec)
            for n, (kv, rec) in view.records(keys.VMS, VMRecord).items()
        },
        placements={
            n: rec for n, (_, rec) in view.records(keys.PLACEMENTS, PlacementRecord).items()
        },
        policy="spread" if policy == "spread" else "binpack",
        networks={
            n: kv.create_revision
            for n, (kv, _) in view.records(keys.NETWORKS, NetworkRecord).items()
        },
        node_networks={
            n: rec for n, (_, rec) in view.records(NODE_NETWORKS, NodeNetworksRecord).items()
        },
    )


class ClusterScheduler:
    def __init__(
        self,
        etcd: Etcd,
        view: ClusterView,
        session: NodeSession,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.etcd = etcd
        self.view = view
        self.session = session
        self.cfg = session.cfg
        self.clock = clock or (lambda: datetime.now(UTC))
        self.leading = False
        self.passes = 0
        self.last_pass_changes = 0
        self._task: asyncio.Task[None] | None = None
        self._election: Election | None = None
        #: more work only the leader does after each pass (cluster schedules); each returns
        #: the revision of its last write (0: none) and never raises for its own failures
        self.leader_tasks: list[Callable[[Election], Awaitable[int]]] = []

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cluster scheduler")

    async def stop(self) -> None:
        await cancel(self._task)
        self._task = None
        if self._election is not None and self.leading:
            with contextlib.suppress(EtcdError):
                await self._election.resign()  # the next candidate leads at once
        self.leading = False

    def current_leader(self) -> str | None:
        """The node that schedules now, from the view (no etcd call)."""
        candidates = self.view.records(keys.SCHEDULER_ELECTION, CandidateRecord)
        if not candidates:
            return None
        _, best = min(candidates.values(), key=lambda item: item[0].create_revision)
        return best.node

    async def _run(self) -> None:
        await self.view.synced.wait()
        while True:
            lease = self.session.lease_id
            if lease is None or not self.session.registered:
                await asyncio.sleep(0.2)
                continue
            election = Election(self.etcd, keys.SCHEDULER_ELECTION, lease)
            self._election = election
            value = CandidateRecord(node=self.cfg.node_name).dump()
            try:
                await election.campaign(value)
                self.leading = True
                log.info("cluster: %s schedules now", self.cfg.node_name)
                await self._lead(election, lease)
            except LeaseNotFound:
                log.info("cluster: the lease under the scheduler candidacy is gone")
            except EtcdError as exc:
                log.info("cluster scheduler: %s; campaigning again", exc)
                await asyncio.sleep(0.5)
            except Exception:
                log.exception("cluster scheduler failed; campaigning again")
                await asyncio.sleep(0.5)
            finally:
                self.leading = False

    async def _lead(self, election: Election, lease: int) -> None:
        version = -1
        while self.session.lease_id == lease and self.session.may_run():
            written = await self.pass_once(election)
            for task in self.leader_tasks:
                written = max(written, await task(election))
            if written:
                await self._catch_up(written)
            version = await self.view.wait_changed(version, PASS_EVERY_S)
            if await self._deposed(election):
                return

    async def _deposed(self, election: Election) -> bool:
        if self.view.revision < election.create_revision:
            return False  # the view has not seen our own key yet
        kv = self.view.get(election.key)
        return kv is None or kv.create_revision != election.create_revision

    async def _catch_up(self, revision: int, timeout: float = 2.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        version = self.view.version
        while self.view.revision < revision and loop.time() < deadline:
            version = await self.view.wait_changed(version, deadline - loop.time())

    async def pass_once(self, election: Election) -> int:
        """Plan and write; returns the revision of the last write (0: nothing written)."""
        changes = plan(snapshot(self.view, self.cfg.policy), self.cfg.node_name, self.clock())
        self.passes += 1
        self.last_pass_changes = len(changes)
        last = 0
        for change in changes:
            revision = await self._write(election, change)
            if revision is None:
                break  # something moved under the plan: plan again on the newer view
            last = revision
        return last

    async def _write(self, election: Election, change: Change) -> int | None:
        key = keys.placement(change.vm)
        current = self.view.get(key)
        condition = absent(key) if current is None else unchanged(key, current.mod_revision)
        op: Put | Delete = (
            Put(key, change.placement.dump()) if change.placement is not None else Delete(key)
        )
        result = await self.etcd.txn(
            [election.leadership(), condition], [op], timeout=self.cfg.etcd_timeout_s
        )
        if not result.succeeded:
            return None
        log.info("cluster: %s: %s", change.vm, change.why)
        return result.revision
