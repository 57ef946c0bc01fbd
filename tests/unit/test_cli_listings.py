"""Listings on an 80-column terminal show every id and name whole; --wide and --json on all.

The CLI talks to a stand-in client here (the listings' layout is what is tested); the
agent's side of id prefixes is tested in test_id_prefixes.py and against a real agent in
tests/integration/test_cli_prefixes.py.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from typer.testing import CliRunner

from stoker.cli import network as network_cli
from stoker.cli import quota as quota_cli
from stoker.cli import schedule as schedule_cli
from stoker.cli import snapshot as snapshot_cli
from stoker.cli import vm as vm_cli
from stoker.cli.main import app
from stoker.domain.spec import VMSpec
from stoker.wire import (
    LimitOut,
    NetworkingOut,
    NetworkOut,
    QuotaOut,
    RestartInfo,
    RunOut,
    ScheduleOut,
    SnapshotOut,
    VerificationOut,
    VMOut,
)

runner = CliRunner()
NOW = datetime.now(UTC)
LONG_NAME = "payments-gateway-eu-west"
VM_ID = "0123456789abcdef"
SNAP_ID = "20261130-043713-a1b2c3"
SCHEDULE_ID = "3f2a9c1b7d4e"


def _vm() -> VMOut:
    return VMOut(
        id=VM_ID,
        name=LONG_NAME,
        state="running",
        state_reason="guest ready: console printed STOKER-GUEST-READY after a long boot",
        state_since=NOW - timedelta(minutes=3),
        created_at=NOW - timedelta(days=2),
        allowed_actions=["stop", "restart"],
        process=None,
        restart=RestartInfo(count=2, last_restart_at=None, next_retry_at=None),
        spec=VMSpec(name=LONG_NAME, kernel="/k", memory_mib=2048, labels={"tier": "web"}),
    )


def _snapshot() -> SnapshotOut:
    return SnapshotOut(
        id=SNAP_ID,
        vm_id=VM_ID,
        vm_name=LONG_NAME,
        created_at=NOW - timedelta(hours=2),
        kind="pre-update",
        tags=["before-upgrade"],
        protected=True,
        with_memory=True,
        size_bytes=123_456_789,
        pause_s=0.1,
        last_verification=VerificationOut(
            at=NOW - timedelta(hours=1), ok=True, deep=True, detail="ok", duration_s=2.5
        ),
        files=None,
    )


def _schedule() -> ScheduleOut:
    return ScheduleOut(
        id=SCHEDULE_ID,
        name="weekday-morning-start",
        action="start",
        vm=LONG_NAME,
        selector=None,
        cron="0 8 * * 1-5",
        tz="Europe/Amsterdam",
        spread_s=0,
        grace_s=600,
        options={},
        enabled=True,
        created_at=NOW,
        updated_at=NOW,
        last_fire_at=NOW,
        next_fire_at=NOW + timedelta(hours=5),
        next_fire_local=None,
        running_run_id=None,
        last_run=RunOut(
            id=7,
            schedule_id=SCHEDULE_ID,
            trigger="cron",
            fire_at=NOW,
            started_at=NOW,
            finished_at=NOW,
            status="ran",
            message="started 1 VM",
            results=[],
        ),
    )


def _quota() -> QuotaOut:
    limit = LimitOut(value=200, source="vm", status="enforced", how="cgroup cpu.max")
    unlimited = LimitOut(value=None, source="none", status="unlimited")
    names = ("cpu_percent", "memory_mib", "disk_gib", "disk_iops", "disk_bytes_per_s")
    limits = {name: limit for name in names}
    limits.update(network_mbps=unlimited, network_pps=unlimited)
    return QuotaOut(
        vm=LONG_NAME,
        vm_id=VM_ID,
        state="running",
        override={},
        defaults={},
        effective={},
        limits=limits,
        applied_at=None,
        cgroup=None,
        usage={},
        violations={},
    )


def _network() -> NetworkOut:
    return NetworkOut(
        id="n" * 16,
        name="backend-services-eu",
        subnet="10.90.0.0/24",
        gateway="10.90.0.1",
        isolation="isolated",
        ipv6_subnet=None,
        bridge="stkb0123456789",
        uplink=None,
        managed_by="api",
        created_at=NOW,
        pool_size=253,
        addresses_used=3,
        dnsmasq_pid=4242,
        dnsmasq_restarts=0,
    )


class FakeClient:
    """What the listing commands ask of the client."""

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def list_vms(self, **_: Any) -> list[VMOut]:
        return [_vm()]

    def list_snapshots(self, _vm: str | None = None) -> list[SnapshotOut]:
        return [_snapshot()]

    def list_schedules(self) -> list[ScheduleOut]:
        return [_schedule()]

    def list_quotas(self) -> list[QuotaOut]:
        return [_quota()]

    def list_networks(self) -> list[NetworkOut]:
        return [_network()]

    def networking(self) -> NetworkingOut:
        return NetworkingOut(
            available=True,
            reason="",
            default_network="default",
            default_subnet="10.88.0.0/24",
            default_modes={"qemu": "managed"},
        )


@pytest.fixture(autouse=True)
def fake_client(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in (vm_cli, snapshot_cli, schedule_cli, quota_cli, network_cli):
        monkeypatch.setattr(module, "client", lambda _ctx: FakeClient())


LISTINGS = {
    "vm list": (["vm", "list"], [LONG_NAME, VM_ID]),
    "snapshot list": (["snapshot", "list"], [SNAP_ID, LONG_NAME]),
    "snapshot list VM": (["snapshot", "list", "demo"], [SNAP_ID]),
    "schedule list": (["schedule", "list"], [SCHEDULE_ID, "weekday-morning-start", LONG_NAME]),
    "quota list": (["quota", "list"], [LONG_NAME]),
    "network list": (["network", "list"], ["backend-services-eu", "stkb0123456789"]),
}


@pytest.mark.parametrize("name", LISTINGS)
def test_ids_and_names_are_whole_at_80_columns(name: str) -> None:
    args, whole = LISTINGS[name]
    result = runner.invoke(app, args, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80, result.output
    for text in whole:
        assert any(text in line for line in lines), f"{text!r} is cut:\n{result.output}"


def test_the_next_run_of_a_schedule_is_whole() -> None:
    result = runner.invoke(app, ["schedule", "list"])
    next_run = (NOW + timedelta(hours=5)).astimezone().strftime("%Y-%m-%d %H:%M")
    assert next_run in result.output, result.output


@pytest.mark.parametrize("name", LISTINGS)
def test_wide_shows_more_and_json_is_the_api_answer(name: str) -> None:
    args, whole = LISTINGS[name]
    narrow = runner.invoke(app, args).output
    wide = runner.invoke(app, [*args, "--wide"])
    assert wide.exit_code == 0, wide.output
    header = wide.output.splitlines()[0].split()
    assert len(header) > len(narrow.splitlines()[0].split()), wide.output
    assert all(text in wide.output for text in whole)
    as_json = runner.invoke(app, [*args, "--json"])
    assert as_json.exit_code == 0 and isinstance(json.loads(as_json.output), list)


def test_vm_list_keeps_the_reason_for_wide() -> None:
    narrow = runner.invoke(app, ["vm", "list"]).output
    assert "STOKER-GUEST-READY" not in narrow
    wide = runner.invoke(app, ["vm", "list", "--wide"]).output
    assert "console printed STOKER-GUEST-READY after a long boot" in wide
