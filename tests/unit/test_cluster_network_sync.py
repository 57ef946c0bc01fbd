"""The node's cluster-network runner on fakes: it makes copies through the local network
service's create, marked as the cluster's, writes its report only when it changed, raises one
alert per conflict, retries a failed create after its backoff, and deletes nothing while etcd
is unreachable. (The decisions themselves: test_cluster_networks.py; on real bridges and a
real etcd: tests/integration/test_cluster_networks.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from stoker.cluster.fencing import Standing
from stoker.cluster.network_sync import NetworkSync
from stoker.cluster.networks import node_networks
from stoker.cluster.records import NetworkRecord, NodeNetworksRecord
from stoker.cluster.view import ClusterView
from stoker.domain.events import EventType
from stoker.domain.networks import Isolation, NetworkSpec
from stoker.domain.networks import NetworkRecord as LocalNetwork
from stoker.domain.spec import VMSpec
from stoker.services.errors import Conflict
from tests.memory_etcd import MemoryEtcd

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


class FakeNetworks:
    """The local network service as the runner uses it."""

    def __init__(self) -> None:
        self.nets: list[LocalNetwork] = []
        self.store = SimpleNamespace(all=lambda: list(self.nets))
        self.available = True
        self.availability = SimpleNamespace(reason="")
        self.created: list[tuple[str, str]] = []
        self.deleted: list[str] = []
        self.refuse: str | None = None

    def add(self, name: str, subnet: str, managed_by: str) -> None:
        self.nets.append(
            LocalNetwork(
                id=name,
                name=name,
                subnet=subnet,
                gateway=subnet.rsplit(".", 1)[0] + ".1",
                isolation=Isolation.ISOLATED,
                bridge=f"stkb{name}",
                created_at=NOW,
                managed_by=managed_by,
            )
        )

    async def create(self, spec: NetworkSpec, managed_by: str = "api") -> None:
        if self.refuse is not None:
            raise Conflict(self.refuse)
        self.created.append((spec.name, managed_by))
        self.add(spec.name, spec.subnet, managed_by)

    async def delete(self, name: str) -> None:
        self.deleted.append(name)
        self.nets = [n for n in self.nets if n.name != name]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Bus:
    def __init__(self) -> None:
        self.events: list[tuple[EventType, str]] = []

    def publish(self, kind: EventType, message: str, vm_id: str | None = None, **_: Any) -> None:
        self.events.append((kind, message))


class World:
    def __init__(self, etcd: MemoryEtcd, view: ClusterView) -> None:
        self.etcd = etcd
        self.view = view
        self.networks = FakeNetworks()
        self.vms: list[Any] = []
        self.standing = Standing.ALIVE
        self.bus = Bus()
        self.clock = Clock()
        cfg = SimpleNamespace(
            node_name="n1", reconcile_interval_s=1.0, restart_backoff_max_s=60.0, etcd_timeout_s=2.0
        )
        session = SimpleNamespace(cfg=cfg, standing=lambda: self.standing)
        directory = SimpleNamespace(all=lambda: list(self.vms))
        self.sync = NetworkSync(
            etcd,  # type: ignore[arg-type]
            view,
            session,  # type: ignore[arg-type]
            self.networks,  # type: ignore[arg-type]
            directory,  # type: ignore[arg-type]
            self.bus,  # type: ignore[arg-type]
            clock=self.clock,
        )

    async def cluster_network(self, name: str, subnet: str) -> None:
        record = NetworkRecord(
            spec=NetworkSpec(name=name, subnet=subnet), created_by="n2", created_at=NOW
        )
        await self.etcd.put(f"/stoker/networks/{name}", record.dump())
        await self.settle()

    async def settle(self) -> None:
        for _ in range(100):
            if self.view.revision == self.etcd.revision:
                return
            await asyncio.sleep(0.001)

    def report(self) -> NodeNetworksRecord | None:
        return self.view.record(node_networks("n1"), NodeNetworksRecord)

    async def pass_once(self) -> None:
        await self.sync.pass_once()
        await self.settle()


@pytest.fixture
async def world() -> AsyncIterator[World]:
    etcd = MemoryEtcd()
    view = ClusterView(etcd)  # type: ignore[arg-type]
    await view.start()
    await asyncio.wait_for(view.synced.wait(), 2)
    yield World(etcd, view)
    await view.stop()


async def test_a_cluster_network_is_made_as_the_cluster_s_and_reported_ready(
    world: World,
) -> None:
    await world.cluster_network("back", "10.90.0.0/24")
    await world.pass_once()
    assert world.networks.created == [("back", "cluster")]
    report = world.report()
    incarnation = world.view.get("/stoker/networks/back")
    assert report is not None and incarnation is not None
    assert report.ready == {"back": incarnation.create_revision} and report.problems == {}
    written = world.etcd.revision
    await world.pass_once()
    assert world.etcd.revision == written  # nothing changed: nothing written
    assert world.networks.created == [("back", "cluster")]


async def test_a_conflict_is_reported_alerted_once_and_never_touched(world: World) -> None:
    world.networks.add("back", "10.90.0.0/24", "api")
    await world.cluster_network("back", "10.90.0.0/24")
    await world.pass_once()
    await world.pass_once()
    assert world.networks.created == [] and world.networks.deleted == []
    report = world.report()
    assert report is not None and report.ready == {}
    assert report.problems["back"].startswith("conflict: a local network 'back'")
    raised = [m for kind, m in world.bus.events if kind == EventType.ALERT_RAISED]
    assert len(raised) == 1 and raised[0].startswith("cluster network back: not usable on n1")


async def test_a_failed_create_is_reported_and_retried_after_its_backoff(world: World) -> None:
    world.networks.refuse = "subnet 10.90.0.0/24 overlaps network 'lab'"
    await world.cluster_network("back", "10.90.0.0/24")
    await world.pass_once()
    report = world.report()
    assert report is not None
    assert report.problems["back"] == (
        "error: could not make it here: subnet 10.90.0.0/24 overlaps network 'lab'"
    )
    world.networks.refuse = None
    await world.pass_once()
    assert world.networks.created == []  # still backing off
    world.clock.now += 1.5
    await world.pass_once()
    assert world.networks.created == [("back", "cluster")]


async def test_nothing_is_deleted_while_etcd_is_unreachable(world: World) -> None:
    world.networks.add("old", "10.91.0.0/24", "cluster")
    world.networks.add("lab", "10.92.0.0/24", "api")
    world.etcd.down = True
    world.standing = Standing.AT_RISK
    await world.sync.pass_once()  # the report cannot be written: no error either
    assert world.networks.deleted == []
    world.etcd.down = False
    world.standing = Standing.ALIVE
    world.vms = [SimpleNamespace(name="web", spec=_on("old"))]
    await world.pass_once()
    assert world.networks.deleted == []  # a local VM is on it
    world.vms = []
    await world.pass_once()
    assert world.networks.deleted == ["old"]  # never "lab": not the cluster's


def _on(network: str) -> VMSpec:
    return VMSpec.model_validate(
        {"name": "web", "kernel": "/k", "network": {"mode": "managed", "name": network}}
    )
