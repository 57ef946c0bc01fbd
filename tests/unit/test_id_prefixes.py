"""Any unique prefix of an id names a VM, snapshot or schedule, as git and docker do; an
ambiguous one is a 409 that lists the candidates; too short a prefix is never tried."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from stoker.agent import build_services
from stoker.api.app import create_app
from stoker.config import AgentConfig
from stoker.domain.refs import AmbiguousPrefix, Candidate, unique_prefix
from stoker.domain.schedules import ScheduleRecord
from stoker.domain.snapshots import SnapshotRecord
from stoker.domain.spec import VMSpec
from stoker.domain.states import VMState
from stoker.domain.vm import VM
from stoker.store.db import Database

NOW = datetime.now(UTC)


def test_unique_prefix_rules() -> None:
    ids = [Candidate("abcd1234", "one"), Candidate("abcd9999", "two"), Candidate("ffff0000", "x")]
    assert unique_prefix("abcd1", ids) == "abcd1234"
    assert unique_prefix("ffff", ids) == "ffff0000"
    assert unique_prefix("0000", ids) is None
    assert unique_prefix("fff", ids) is None  # shorter than MIN_PREFIX: not tried
    with pytest.raises(AmbiguousPrefix) as caught:
        unique_prefix("abcd", ids)
    assert [c.id for c in caught.value.candidates] == ["abcd1234", "abcd9999"]


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    db = Database(tmp_path / "s.db")
    services = build_services(AgentConfig(data_dir=tmp_path), db, drivers={})
    for vm_id, name in (("abcd000011112222", "web"), ("abcd999911112222", "db")):
        spec = VMSpec.model_validate({"name": name, "kernel": "/k"})
        services.directory.store.insert(VM(vm_id, name, spec, VMState.STOPPED, "stopped", NOW, NOW))
    for snap_id, vm_id, name in (
        ("20261130-043713-a1b2c3", "abcd000011112222", "web"),
        ("20261130-043713-ffffff", "abcd000011112222", "web"),
        ("20261130-050000-000000", "abcd999911112222", "db"),
    ):
        root = tmp_path / "snapshots" / snap_id
        root.mkdir(parents=True)
        (root / "manifest.json").write_text('{"files": {}}')
        services.snapshots.store.insert(
            SnapshotRecord(snap_id, vm_id, name, NOW, "manual", (), False, False, 1, str(root))
        )
    for schedule_id, name in (("3f2a9c1b7d4e", "morning"), ("3f2a00000000", None)):
        row = ScheduleRecord(
            id=schedule_id, name=name, action="start", vm="web", selector=None,
            cron="0 8 * * *", tz="UTC", spread_s=0, grace_s=600, options={}, enabled=True,
            created_at=NOW, updated_at=NOW, last_fire_at=NOW,
        )  # fmt: skip
        services.scheduler.store.insert(row)
    app = create_app(services)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://stoker"
    ) as client:
        yield client
    db.close()


async def test_vm_by_id_prefix(api: httpx.AsyncClient) -> None:
    assert (await api.get("/api/v1/vms/abcd0000")).json()["name"] == "web"
    assert (await api.get("/api/v1/vms/db")).json()["id"] == "abcd999911112222"
    ambiguous = await api.get("/api/v1/vms/abcd")
    assert ambiguous.status_code == 409
    body = ambiguous.json()
    assert [c["id"] for c in body["candidates"]] == ["abcd000011112222", "abcd999911112222"]
    assert "abcd000011112222 (web)" in body["detail"] and "type more" in body["detail"]
    assert (await api.get("/api/v1/vms/abc")).status_code == 404  # too short to try
    # the snapshots of a VM named by a prefix
    listed = (await api.get("/api/v1/vms/abcd9999/snapshots")).json()
    assert [s["id"] for s in listed] == ["20261130-050000-000000"]


async def test_snapshot_by_id_prefix(api: httpx.AsyncClient) -> None:
    one = await api.get("/api/v1/snapshots/20261130-0500")
    assert one.status_code == 200 and one.json()["id"] == "20261130-050000-000000"
    ambiguous = await api.get("/api/v1/snapshots/20261130-043713")
    assert ambiguous.status_code == 409
    assert len(ambiguous.json()["candidates"]) == 2
    protected = await api.post("/api/v1/snapshots/20261130-043713-a/protect")
    assert protected.status_code == 200 and protected.json()["protected"] is True
    assert (await api.get("/api/v1/snapshots/20261201")).status_code == 404


async def test_schedule_by_id_prefix(api: httpx.AsyncClient) -> None:
    assert (await api.get("/api/v1/schedules/3f2a9")).json()["name"] == "morning"
    assert (await api.get("/api/v1/schedules/morning")).json()["id"] == "3f2a9c1b7d4e"
    ambiguous = await api.get("/api/v1/schedules/3f2a")
    assert ambiguous.status_code == 409
    assert {c["name"] for c in ambiguous.json()["candidates"]} == {"morning", "start"}
    disabled = await api.post("/api/v1/schedules/3f2a0/disable")
    assert disabled.status_code == 200 and disabled.json()["id"] == "3f2a00000000"
