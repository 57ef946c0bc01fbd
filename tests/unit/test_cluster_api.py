"""The cluster API's trust boundary: every field checked, etcd trouble as 503 problem+json.

The router runs on a real FastAPI app with fake cluster operations behind it: these tests are
about what reaches them and what comes back, not about etcd (tests/integration/test_cluster.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from stoker.agent import build_services
from stoker.api.app import create_app
from stoker.cluster.errors import unavailable
from stoker.cluster.etcd import EtcdUnavailable
from stoker.config import AgentConfig
from stoker.store.db import Database
from stoker.wire.cluster import ClusterVMCreate
from tests.fakes import FakeDriver


class FakeOps:
    def __init__(self) -> None:
        self.created: list[ClusterVMCreate] = []

    async def create(self, request: ClusterVMCreate, wait_s: float = 0) -> Any:
        self.created.append(request)
        raise unavailable(EtcdUnavailable(["http://10.0.0.1:2379"], "no answer within 2 s"))


@dataclasses.dataclass
class FakeCluster:
    ops: FakeOps


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, FakeOps]]:
    db = Database(tmp_path / "stoker.db")
    services = build_services(AgentConfig(data_dir=tmp_path), db, drivers={"qemu": FakeDriver()})
    ops = FakeOps()
    app = create_app(dataclasses.replace(services, cluster=FakeCluster(ops)))  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://stoker") as client:
        yield client, ops
    db.close()


SPEC = {"name": "web", "kernel": "/boot/vmlinuz"}


async def test_single_host_mode_has_no_cluster_api(tmp_path: Path) -> None:
    db = Database(tmp_path / "stoker.db")
    services = build_services(AgentConfig(data_dir=tmp_path), db, drivers={"qemu": FakeDriver()})
    assert services.cluster is None
    assert not any(p.startswith("/api/v1/cluster") for p in create_app(services).openapi()["paths"])
    db.close()


async def test_etcd_unreachable_is_a_503_saying_cluster_writes_are_unavailable(
    api: tuple[httpx.AsyncClient, FakeOps],
) -> None:
    client, ops = api
    answer = await client.post("/api/v1/cluster/vms", json={"spec": SPEC})
    assert answer.status_code == 503
    assert answer.headers["content-type"] == "application/problem+json"
    body = answer.json()
    assert body["title"] == "Cluster unavailable"
    assert body["detail"].startswith("cluster writes are unavailable: etcd unreachable at")
    assert "VMs keep running" in body["detail"]
    assert ops.created[0].spec.name == "web"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"spec": {**SPEC, "labels": {"stoker.cluster/incarnation": "1"}}}, "reserved"),
        ({"spec": {**SPEC, "memory_mib": 10**12}}, "spec.memory_mib"),
        ({"spec": {**SPEC, "name": "a/b"}}, "spec.name"),
        ({"spec": SPEC, "placement": {"anti_affinity": "UPPER"}}, "placement.anti_affinity"),
        ({"spec": SPEC, "placement": {"policy": "random"}}, "placement.policy"),
        ({"spec": SPEC, "placement": {"selector": {f"k{i}": "v" for i in range(17)}}}, "selector"),
        ({"spec": SPEC, "stateless": "yes please"}, "stateless"),
        ({"spec": SPEC, "surprise": True}, "surprise"),
    ],
)
async def test_every_field_is_checked(
    api: tuple[httpx.AsyncClient, FakeOps], body: dict[str, Any], field: str
) -> None:
    client, ops = api
    answer = await client.post("/api/v1/cluster/vms", json=body)
    assert answer.status_code == 422, answer.text
    assert field in answer.json()["detail"]
    assert not ops.created


async def test_infinity_is_not_a_number(api: tuple[httpx.AsyncClient, FakeOps]) -> None:
    client, ops = api
    raw = '{"spec": {"name": "web", "kernel": "/k", "boot_timeout_s": 1e400}}'
    answer = await client.post(
        "/api/v1/cluster/vms", content=raw, headers={"content-type": "application/json"}
    )
    assert answer.status_code == 422
    assert "boot_timeout_s" in answer.json()["detail"]
    assert not ops.created


async def test_a_bad_wait_is_refused(api: tuple[httpx.AsyncClient, FakeOps]) -> None:
    client, _ = api
    answer = await client.post("/api/v1/cluster/vms?wait_s=1e400", json={"spec": SPEC})
    assert answer.status_code == 422
