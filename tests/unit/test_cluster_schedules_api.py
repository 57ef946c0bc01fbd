"""The cluster schedule API's trust boundary: every field checked and bounded, etcd trouble as
503 problem+json. Fake operations behind a real FastAPI app (the etcd side is in
tests/integration/test_cluster_schedules.py)."""

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
from stoker.services.errors import NotFound
from stoker.store.db import Database
from stoker.wire.cluster import ClusterScheduleCreate
from tests.fakes import FakeDriver


class FakeSchedules:
    def __init__(self) -> None:
        self.created: list[ClusterScheduleCreate] = []

    async def create(self, request: ClusterScheduleCreate) -> Any:
        self.created.append(request)
        raise unavailable(EtcdUnavailable(["http://10.0.0.1:2379"], "no answer within 2 s"))

    def all(self) -> list[Any]:
        return []

    def get(self, name: str) -> Any:
        raise NotFound(f"no cluster schedule named {name!r} (`stoker cluster schedule list`)")

    async def delete(self, name: str) -> None:
        raise unavailable(EtcdUnavailable(["http://10.0.0.1:2379"], "no answer within 2 s"))


@dataclasses.dataclass
class FakeCluster:
    schedules: FakeSchedules


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, FakeSchedules]]:
    db = Database(tmp_path / "stoker.db")
    services = build_services(AgentConfig(data_dir=tmp_path), db, drivers={"qemu": FakeDriver()})
    fake = FakeSchedules()
    app = create_app(dataclasses.replace(services, cluster=FakeCluster(fake)))  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://stoker") as client:
        yield client, fake
    db.close()


URL = "/api/v1/cluster/schedules"
BODY = {"name": "nightly", "cron": "0 22 * * *", "action": "stop", "selector": {"team": "web"}}


async def test_etcd_unreachable_is_a_503(api: tuple[httpx.AsyncClient, FakeSchedules]) -> None:
    client, fake = api
    answer = await client.post(URL, json={**BODY, "tz": "Europe/Berlin"})
    assert answer.status_code == 503
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["detail"].startswith("cluster writes are unavailable: etcd unreachable")
    assert fake.created[0].cron == "0 22 * * *" and fake.created[0].tz == "Europe/Berlin"
    deleted = await client.delete(f"{URL}/nightly")
    assert deleted.status_code == 503


async def test_aliases_are_normalised(api: tuple[httpx.AsyncClient, FakeSchedules]) -> None:
    client, fake = api
    await client.post(URL, json={**BODY, "cron": "@daily", "action": "restart"})
    assert fake.created[0].cron == "0 0 * * *" and fake.created[0].action == "restart"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**BODY, "cron": "0 8 * *"}, "exactly 5"),
        ({**BODY, "cron": "61 8 * * *"}, "minute field"),
        ({**BODY, "cron": "@reboot"}, "@reboot"),
        ({**BODY, "cron": "x" * 300}, "cron"),
        ({**BODY, "action": "snapshot"}, "action"),
        ({**BODY, "vm": "web-1"}, "exactly one target"),
        ({k: v for k, v in BODY.items() if k != "selector"}, "exactly one target"),
        ({**BODY, "selector": {}}, "at least one label"),
        ({**BODY, "selector": {f"k{i}": "v" for i in range(17)}}, "selector"),
        ({**BODY, "selector": {"bad key!": "v"}}, "label key"),
        ({**BODY, "name": "Nightly/x"}, "name"),
        ({**BODY, "grace_s": -1}, "grace_s"),
        ({**BODY, "grace_s": 10**9}, "grace_s"),
        ({**BODY, "tz": "x" * 65}, "tz"),
        ({**BODY, "surprise": True}, "surprise"),
    ],
)
async def test_every_field_is_checked(
    api: tuple[httpx.AsyncClient, FakeSchedules], body: dict[str, Any], field: str
) -> None:
    client, fake = api
    answer = await client.post(URL, json=body)
    assert answer.status_code == 422, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    assert field in answer.json()["detail"]
    assert not fake.created


async def test_infinity_is_not_a_number(api: tuple[httpx.AsyncClient, FakeSchedules]) -> None:
    client, fake = api
    raw = '{"name": "n", "cron": "@daily", "action": "stop", "vm": "web", "grace_s": 1e400}'
    answer = await client.post(URL, content=raw, headers={"content-type": "application/json"})
    assert answer.status_code == 422
    assert "grace_s" in answer.json()["detail"]
    assert not fake.created


async def test_reads(api: tuple[httpx.AsyncClient, FakeSchedules]) -> None:
    client, _ = api
    listed = await client.get(URL)
    assert listed.status_code == 200 and listed.json() == []
    missing = await client.get(f"{URL}/nope")
    assert missing.status_code == 404
    assert "stoker cluster schedule list" in missing.json()["detail"]
    too_long = await client.get(f"{URL}/{'a' * 64}")
    assert too_long.status_code == 422
