"""The node side of cluster networks: make this node's local networks match the cluster's,
and tell the scheduler which are ready here.

Passes run on every view change and every ``reconcile_interval_s``, like the reconciler's.
Each pass asks ``networks.plan_networks`` what to do, makes missing copies through the local
network service's own create (bridge, NAT, DHCP: every check a local create has), deletes
copies whose network left the cluster once no local VM is on them, and writes the node's
``node-networks/<node>`` report when it changed. While etcd is unreachable the view stands
still and ``may_delete`` is false: copies are still made from the last view, nothing is
deleted, and the report is written once etcd answers again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

from stoker.cluster import keys
from stoker.cluster.etcd import Etcd, EtcdError
from stoker.cluster.fencing import Standing
from stoker.cluster.networks import (
    CLUSTER_MANAGER,
    NetworkPlan,
    Wanted,
    node_networks,
    plan_networks,
)
from stoker.cluster.records import NetworkRecord, NodeNetworksRecord, now_utc
from stoker.cluster.session import NodeSession
from stoker.cluster.view import ClusterView
from stoker.domain.events import EventType
from stoker.domain.spec import NetworkMode
from stoker.services.directory import VMDirectory
from stoker.services.errors import ServiceError
from stoker.services.events import EventBus
from stoker.services.loops import cancel
from stoker.services.networks import NetworkService

log = logging.getLogger("stoker.cluster")

_FIRST_BACKOFF_S = 1.0
#: problems worth an operator's attention (not "pending")
_ALERTING = ("conflict", "error", "managed networking")


class NetworkSync:
    def __init__(
        self,
        etcd: Etcd,
        view: ClusterView,
        session: NodeSession,
        networks: NetworkService,
        directory: VMDirectory,
        events: EventBus | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.etcd = etcd
        self.view = view
        self.session = session
        self.networks = networks
        self.directory = directory
        self.events = events
        self.cfg = session.cfg
        self.me = session.cfg.node_name
        self.clock = clock
        #: name -> (incarnation, why, next try at, delay) after a failed create
        self._failed: dict[str, tuple[int, str, float, float]] = {}
        #: name -> the problem last raised as an alert
        self._alerted: dict[str, str] = {}
        self.last: NetworkPlan = NetworkPlan()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cluster networks")

    async def stop(self) -> None:
        await cancel(self._task)
        self._task = None

    async def _run(self) -> None:
        await self.view.synced.wait()
        version = -1
        while True:
            version = self.view.version
            try:
                await self.pass_once()
            except Exception:
                log.exception("cluster networks pass failed")
            await self.view.wait_changed(version, self.cfg.reconcile_interval_s)

    # -- one pass ------------------------------------------------------------------------------

    def wanted(self) -> dict[str, Wanted]:
        return {
            name: Wanted(name, kv.create_revision, record.spec)
            for name, (kv, record) in self.view.records(keys.NETWORKS, NetworkRecord).items()
        }

    def users(self) -> dict[str, list[str]]:
        """Local network name -> the local VMs on it."""
        found: dict[str, list[str]] = {}
        for vm in self.directory.all():
            net = vm.spec.network
            if net.mode == NetworkMode.MANAGED and net.name is not None:
                found.setdefault(net.name, []).append(vm.name)
        return found

    def plan(self, wanted: Mapping[str, Wanted]) -> NetworkPlan:
        now = self.clock()
        failed = {
            name: why
            for name, (incarnation, why, until, _) in self._failed.items()
            if until > now and name in wanted and wanted[name].incarnation == incarnation
        }
        return plan_networks(
            wanted,
            self.networks.store.all(),
            self.users(),
            may_delete=self.session.standing() == Standing.ALIVE,
            unavailable=None if self.networks.available else self.networks.availability.reason,
            failed=failed,
        )

    async def pass_once(self) -> NetworkPlan:
        wanted = self.wanted()
        todo = self.plan(wanted)
        for want in todo.create:
            await self._create(want)
        for name in todo.delete:
            await self._delete(name)
        done = self.plan(wanted) if todo.create or todo.delete else todo
        self.last = done
        self._alert(done.problems)
        await self._report(done)
        return done

    async def _create(self, want: Wanted) -> None:
        try:
            await self.networks.create(want.spec, managed_by=CLUSTER_MANAGER)
        except ServiceError as exc:
            previous = self._failed.get(want.name)
            delay = _FIRST_BACKOFF_S
            if previous is not None and previous[0] == want.incarnation:
                delay = min(previous[3] * 2, self.cfg.restart_backoff_max_s)
            self._failed[want.name] = (want.incarnation, exc.detail, self.clock() + delay, delay)
            log.warning("cluster network %s: cannot make it on this node: %s", want.name, exc)
            return
        self._failed.pop(want.name, None)
        log.info("cluster network %s made on this node (%s)", want.name, want.spec.subnet)

    async def _delete(self, name: str) -> None:
        try:
            await self.networks.delete(name)
        except ServiceError as exc:  # a VM joined it meanwhile: the next pass looks again
            log.info("cluster network %s left the cluster; not deleted yet: %s", name, exc)
            return
        log.info("cluster network %s left the cluster: deleted on this node", name)

    def _alert(self, problems: Mapping[str, str]) -> None:
        """Log and publish a problem once when it appears or changes, and when it clears."""
        current = {n: why for n, why in problems.items() if why.startswith(_ALERTING)}
        for name, why in sorted(current.items()):
            if self._alerted.get(name) != why:
                log.warning("cluster network %s is not usable on node %s: %s", name, self.me, why)
                self._publish(EventType.ALERT_RAISED, name, f"not usable on {self.me}: {why}")
        for name in sorted(set(self._alerted) - set(current)):
            self._publish(EventType.ALERT_CLEARED, name, f"usable again on {self.me}")
        self._alerted = current

    def _publish(self, kind: EventType, name: str, what: str) -> None:
        if self.events is not None:
            self.events.publish(
                kind, f"cluster network {name}: {what}", None, resource="network", network=name
            )

    async def _report(self, done: NetworkPlan) -> None:
        """Write this node's report when it differs from what etcd holds (when etcd is
        unreachable the next pass tries again)."""
        key = node_networks(self.me)
        current = self.view.record(key, NodeNetworksRecord)
        ready, problems = dict(done.ready), dict(done.problems)
        if current is not None and current.ready == ready and current.problems == problems:
            return
        record = NodeNetworksRecord(
            ready=ready, problems={n: why[:2000] for n, why in problems.items()}, at=now_utc()
        )
        try:
            await self.etcd.put(key, record.dump(), timeout=self.cfg.etcd_timeout_s)
        except EtcdError as exc:
            log.debug("cluster networks: report not written: %s", exc)
