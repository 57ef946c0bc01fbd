"""GET /api/v1/events: filters, time and duration for ``since``, and clear 4xx answers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from stoker.agent import build_services
from stoker.api.app import create_app
from stoker.config import AgentConfig
from stoker.domain.events import EventType
from stoker.domain.spec import VMSpec
from stoker.domain.states import VMState
from stoker.domain.vm import VM
from stoker.store.db import Database


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    db = Database(tmp_path / "s.db")
    # the agent's real services over a temporary database, without hypervisors
    services = build_services(AgentConfig(data_dir=tmp_path), db, drivers={})
    now = datetime.now(UTC)
    spec = VMSpec.model_validate({"name": "web", "kernel": "/k"})
    services.directory.store.insert(
        VM("a" * 16, "web", spec, VMState.RUNNING, "guest ready", now, now)
    )
    # written to the log at times in the past, one minute apart (through the store: the bus
    # would stamp them now and hand them to the listeners, which could add events of their own)
    first = datetime(2020, 1, 2, 6, 0, tzinfo=UTC)
    for minute, (vm_id, type_, message, data) in enumerate(
        [
            ("a" * 16, EventType.VM_STATE, "web: starting -> running", {"to_state": "running"}),
            ("a" * 16, EventType.VM_HEALTH, "web: unknown -> healthy", {"to_health": "healthy"}),
            ("b" * 16, EventType.VM_STATE, "gone: running -> error", {"to_state": "error"}),
        ]
    ):
        services.events.store.append(first + timedelta(minutes=minute), vm_id, type_, message, data)
    app = create_app(services)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://stoker"
    ) as client:
        yield client
    db.close()


async def test_filters_by_vm_name_type_prefix_and_time(api: httpx.AsyncClient) -> None:
    everything = (await api.get("/api/v1/events")).json()
    assert [e["type"] for e in everything] == ["vm.state", "vm.health", "vm.state"]
    web = (await api.get("/api/v1/events", params={"vm": "web"})).json()
    assert len(web) == 2 and all(e["vm_id"] == "a" * 16 for e in web)
    # a deleted VM's events are still found by its id
    assert len((await api.get("/api/v1/events", params={"vm": "b" * 16})).json()) == 1
    health = (await api.get("/api/v1/events", params={"type": "vm.health"})).json()
    assert [e["data"] for e in health] == [{"to_health": "healthy"}]
    assert len((await api.get("/api/v1/events", params={"type": "vm.*"})).json()) == 3
    since = (await api.get("/api/v1/events", params={"since": "2020-01-02T06:01:00Z"})).json()
    assert since[0]["message"] == "web: unknown -> healthy"
    recent = (await api.get("/api/v1/events", params={"since": "10m"})).json()
    assert recent == []  # the clock above is in the past
    after = (await api.get("/api/v1/events", params={"after": everything[1]["id"]})).json()
    assert len(after) == 1
    assert len((await api.get("/api/v1/events", params={"limit": 1})).json()) == 1


async def test_bad_input_is_a_clear_4xx(api: httpx.AsyncClient) -> None:
    bad = await api.get("/api/v1/events", params={"since": "yesterday-ish"})
    assert bad.status_code == 422
    assert bad.headers["content-type"] == "application/problem+json"
    assert bad.json()["errors"][0]["field"] == "since"
    missing = await api.get("/api/v1/events", params={"vm": "nope"})
    assert missing.status_code == 404 and "nope" in missing.json()["detail"]
    huge = await api.get("/api/v1/events", params={"since": "99999999999999w"})
    assert huge.status_code == 422  # every duration is at most a century
    assert "longer than a century" in huge.json()["detail"]
