"""GET /api/v1/events: filters, time and duration for ``since``, and clear 4xx answers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest

from stoker.api.app import create_app
from stoker.domain.spec import VMSpec
from stoker.domain.states import VMState
from stoker.domain.vm import VM
from stoker.services.container import Services
from stoker.services.events import EventBus
from stoker.services.lifecycle import Lifecycle
from stoker.store.db import Database
from stoker.store.events import EventStore
from stoker.store.vms import VMStore


@pytest.fixture
async def api(tmp_path):
    db = Database(tmp_path / "s.db")
    vms = VMStore(db)
    clock = iter(datetime(2020, 1, 2, 6, 0, tzinfo=UTC) + timedelta(minutes=i) for i in range(99))
    events = EventBus(EventStore(db), clock=lambda: next(clock))
    now = datetime.now(UTC)
    spec = VMSpec.model_validate({"name": "web", "kernel": "/k"})
    vms.insert(VM("a" * 16, "web", spec, VMState.RUNNING, "guest ready", now, now))
    events.publish("vm.state", "web: starting -> running", "a" * 16, to_state="running")
    events.publish("vm.health", "web: unknown -> healthy", "a" * 16, to_health="healthy")
    events.publish("vm.state", "gone: running -> error", "b" * 16, to_state="error")
    app = create_app(Services(Lifecycle(vms, events, {}, tmp_path), events))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://stoker"
    ) as client:
        yield client
    db.close()


async def test_filters_by_vm_name_type_prefix_and_time(api):
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


async def test_bad_input_is_a_clear_4xx(api):
    bad = await api.get("/api/v1/events", params={"since": "yesterday-ish"})
    assert bad.status_code == 422
    assert bad.headers["content-type"] == "application/problem+json"
    assert bad.json()["errors"][0]["field"] == "since"
    missing = await api.get("/api/v1/events", params={"vm": "nope"})
    assert missing.status_code == 404 and "nope" in missing.json()["detail"]
    huge = await api.get("/api/v1/events", params={"since": "99999999999999w"})
    assert huge.status_code == 200
