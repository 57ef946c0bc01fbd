"""The cluster network API's trust boundary: every field checked, one winner per name, a
delete refused while a cluster VM names the network, etcd trouble as 503 problem+json.

The real router and the real ``ClusterNetworkOps`` and ``ClusterView`` run on an in-memory
stand-in for etcd (tests/integration/test_cluster_networks.py runs them on a real one).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from stoker.agent import build_services
from stoker.api.app import create_app
from stoker.cluster.network_ops import ClusterNetworkOps
from stoker.cluster.records import VMRecord, now_utc
from stoker.cluster.view import ClusterView
from stoker.config import AgentConfig
from stoker.domain.spec import VMSpec
from stoker.store.db import Database
from tests.fakes import FakeDriver
from tests.memory_etcd import MemoryEtcd


@dataclasses.dataclass
class FakeCluster:
    network_ops: ClusterNetworkOps


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, MemoryEtcd]]:
    db = Database(tmp_path / "stoker.db")
    services = build_services(AgentConfig(data_dir=tmp_path), db, drivers={"qemu": FakeDriver()})
    etcd = MemoryEtcd()
    view = ClusterView(etcd)  # type: ignore[arg-type]
    await view.start()
    await asyncio.wait_for(view.synced.wait(), 2)
    session = SimpleNamespace(cfg=SimpleNamespace(node_name="n1"), last_error=None)
    ops = ClusterNetworkOps(etcd, view, session)  # type: ignore[arg-type]
    app = create_app(dataclasses.replace(services, cluster=FakeCluster(ops)))  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://stoker") as client:
        yield client, etcd
    await view.stop()
    db.close()


URL = "/api/v1/cluster/networks"
BODY = {"name": "back", "subnet": "10.90.0.0/24"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**BODY, "name": "Back/1"}, "name"),
        ({**BODY, "subnet": "10.90.0.0/24" + " " * 8}, "subnet"),
        ({**BODY, "bridge": "b" * 16}, "bridge"),
        ({**BODY, "uplink": "eth 0"}, "uplink"),
        ({**BODY, "isolation": "sideways"}, "isolation"),
        ({**BODY, "ipv6": "perhaps"}, "ipv6"),
        ({**BODY, "surprise": 1}, "surprise"),
        ({"name": "back"}, "subnet"),
    ],
)
async def test_every_field_is_checked(
    world: tuple[httpx.AsyncClient, MemoryEtcd], body: dict[str, Any], field: str
) -> None:
    client, etcd = world
    answer = await client.post(URL, json=body)
    assert answer.status_code == 422, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    assert field in answer.json()["detail"]
    assert not etcd.kvs


async def test_a_subnet_that_is_not_private_is_refused_naming_the_field(
    world: tuple[httpx.AsyncClient, MemoryEtcd],
) -> None:
    client, etcd = world
    answer = await client.post(URL, json={**BODY, "subnet": "8.8.8.0/24"})
    assert answer.status_code == 422
    assert "subnet" in answer.json()["detail"] and "not private" in answer.json()["detail"]
    assert not etcd.kvs


async def test_names_in_paths_are_bounded(world: tuple[httpx.AsyncClient, MemoryEtcd]) -> None:
    client, _ = world
    assert (await client.get(f"{URL}/{'a' * 64}")).status_code == 422
    assert (await client.delete(f"{URL}/{'a' * 64}")).status_code == 422
    assert (await client.get(f"{URL}/nothing")).status_code == 404


async def test_created_once_per_name_and_subnets_never_overlap(
    world: tuple[httpx.AsyncClient, MemoryEtcd],
) -> None:
    client, _ = world
    inside = await client.post(URL, json={**BODY, "subnet": "10.90.0.7/24"})
    assert inside.status_code == 422 and "did you mean 10.90.0.0/24?" in inside.text
    made = await client.post(URL, json=BODY)
    assert made.status_code == 201, made.text
    assert made.json()["created_by"] == "n1" and made.json()["vms"] == []
    again = await client.post(URL, json={**BODY, "subnet": "10.91.0.0/24"})
    assert again.status_code == 409
    assert "a cluster network named 'back' already exists (created by node n1" in again.text
    overlap = await client.post(URL, json={"name": "wide", "subnet": "10.90.0.0/16"})
    assert overlap.status_code == 409 and "overlaps cluster network 'back'" in overlap.text
    listed = await client.get(URL)
    assert [n["name"] for n in listed.json()] == ["back"]


async def test_delete_is_refused_while_a_cluster_vm_names_the_network(
    world: tuple[httpx.AsyncClient, MemoryEtcd],
) -> None:
    client, etcd = world
    assert (await client.post(URL, json=BODY)).status_code == 201
    for name in ("web", "db"):
        spec = VMSpec.model_validate(
            {"name": name, "kernel": "/k", "network": {"mode": "managed", "name": "back"}}
        )
        record = VMRecord(spec=spec, created_by="n1", created_at=now_utc())
        await etcd.put(f"/stoker/vms/{name}", record.dump())
    await asyncio.sleep(0.05)  # the view follows the watch
    refused = await client.delete(f"{URL}/back")
    assert refused.status_code == 409
    assert "in use by 2 cluster VM(s): db, web; delete them first" in refused.json()["detail"]
    assert (await client.get(f"{URL}/back")).json()["vms"] == ["db", "web"]
    for name in ("web", "db"):
        await etcd.delete_key(f"/stoker/vms/{name}")
    await asyncio.sleep(0.05)
    assert (await client.delete(f"{URL}/back")).status_code == 204
    assert (await client.get(f"{URL}/back")).status_code == 404


async def test_etcd_unreachable_is_a_503_and_nothing_is_written(
    world: tuple[httpx.AsyncClient, MemoryEtcd],
) -> None:
    client, etcd = world
    etcd.down = True
    answer = await client.post(URL, json=BODY)
    assert answer.status_code == 503
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["detail"].startswith("cluster writes are unavailable: etcd unreachable")
    assert (await client.get(URL)).json() == []  # reads answer from the last view
