"""Plan and apply on a real agent graph (real SQLite, real services) over the null
hypervisor: what apply does, what it records, and that a second apply has nothing to do.

Managed networking and cgroups are off (a cgroup root that is an empty directory), so
nothing here touches the host; tests/integration/test_manifests.py does it with QEMU.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from stoker.agent import build_services
from stoker.api.app import create_app
from stoker.config import AgentConfig
from stoker.domain.events import EventType
from stoker.domain.manifests import ManifestSource
from stoker.domain.quota import Quota
from stoker.domain.spec import VMSpec
from stoker.domain.states import VMState
from stoker.manifest import Op, Step
from stoker.services.container import Services
from stoker.services.errors import Conflict
from stoker.services.manifests import ApplyFailed, ManifestInvalid, ManifestService
from stoker.services.scheduler import ScheduleSpec
from stoker.store.db import Database
from tests.fakes import FakeDriver

HOST = """
[defaults]
quota = { cpu_percent = 100 }
snapshot_policy = { retention = "daily:7", interval = "1d" }

[[vm]]
name = "web"
kernel = "/boot/vmlinuz"
memory_mib = 256
labels = { tier = "web" }
running = true

[[vm.schedules]]
action = "stop"
cron = "0 18 * * *"

[[vm]]
name = "db"
kernel = "/boot/vmlinuz"

[[schedule]]
name = "nightly"
action = "snapshot"
selector = { tier = "web" }
cron = "30 2 * * *"
"""


def files(text: str = HOST, name: str = "host.toml") -> list[ManifestSource]:
    return [ManifestSource(name, text)]


def edited(*pairs: tuple[str, str]) -> list[ManifestSource]:
    text = HOST
    for old, new in pairs:
        assert old in text, old
        text = text.replace(old, new)
    return files(text)


@dataclass
class World:
    services: Services
    driver: FakeDriver

    @property
    def manifests(self) -> ManifestService:
        return self.services.manifests

    def names(self) -> set[str]:
        return {vm.name for vm in self.services.directory.all()}

    def events(self, type: EventType) -> list[str]:
        return [e.message for e in self.services.events.store.query(type=type.value)]

    async def settle(self) -> None:
        for vm in self.services.directory.all():
            await self.services.lifecycle.wait_settled(vm.id, 2.0)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    (tmp_path / "cgroups").mkdir()
    config = AgentConfig(
        data_dir=tmp_path,
        sections={
            "network": {"enabled": False},
            "quotas": {"cgroup_root": str(tmp_path / "cgroups")},
        },
    )
    db = Database(tmp_path / "stoker.db")
    driver = FakeDriver(script={"ready_after_s": 0.01})
    services = build_services(config, db, drivers={"qemu": driver})
    yield World(services, driver)
    await services.lifecycle.shutdown()
    await services.events.drain()
    db.close()


def ops(steps: tuple[Step, ...]) -> list[tuple[str, str, str]]:
    return [(str(s.kind), str(s.op), s.name) for s in steps]


async def test_apply_creates_everything_and_a_second_apply_changes_nothing(world: World) -> None:
    result = await world.manifests.apply(files())
    assert result.done == len(result.plan.steps) == 9
    await world.settle()
    assert world.names() == {"web", "db"}
    web = world.services.directory.get("web")
    assert web.state == VMState.RUNNING
    assert world.services.quotas.override(web.id) == Quota(cpu_percent=100)
    assert world.services.snapshots.get_policy("db").retention == "daily:7"
    assert {s.name for s in world.services.scheduler.all()} >= {"nightly", "web-stop"}

    again = await world.manifests.plan(files())
    assert again.steps == () and again.drift == () and again.exit_code() == 0
    second = await world.manifests.apply(files())
    assert second.done == 0
    applied = world.events(EventType.MANIFEST_APPLIED)
    assert len(applied) == 2 and "8 to create" in applied[0] and "no changes" in applied[1]
    head = world.manifests.applied().head
    assert head is not None and head.manifest_hash == result.plan.manifest_hash
    assert head.applying_hash is None and head.sources == tuple(files())
    kinds = {(o.kind, o.name) for o in world.manifests.applied().objects}
    assert ("vm", "web") in kinds and ("quota", "db") in kinds and ("schedule", "nightly") in kinds


async def test_quota_change_is_applied_in_place_without_a_restart(world: World) -> None:
    await world.manifests.apply(files())
    await world.settle()
    spawned = len(world.driver.vmms)
    result = await world.manifests.apply(edited(("cpu_percent = 100", "cpu_percent = 250")))
    assert ops(result.plan.steps) == [("quota", "update", "db"), ("quota", "update", "web")]
    web = world.services.directory.get("web")
    assert world.services.quotas.override(web.id) == Quota(cpu_percent=250)
    assert len(world.driver.vmms) == spawned and web.state == VMState.RUNNING


async def test_memory_of_a_running_vm_waits_for_restart(world: World) -> None:
    await world.manifests.apply(files())
    await world.settle()
    bigger = edited(
        ("memory_mib = 256", "memory_mib = 384"),
        ('labels = { tier = "web" }', 'labels = { tier = "www" }'),
    )
    pending = await world.manifests.apply(bigger)
    assert ops(pending.plan.steps) == [("vm", "pending-restart", "web")]
    web = world.services.directory.get("web")
    assert web.spec.memory_mib == 256 and web.spec.labels == {"tier": "www"}  # the live part
    assert (await world.manifests.plan(bigger)).exit_code() == 2  # still pending
    spawned = len(world.driver.vmms)

    restarted = await world.manifests.apply(bigger, restart=True)
    assert ops(restarted.plan.steps) == [("vm", "update-restart", "web"), ("vm", "start", "web")]
    await world.settle()
    web = world.services.directory.get("web")
    assert web.spec.memory_mib == 384 and web.state == VMState.RUNNING
    assert len(world.driver.vmms) == spawned + 1
    assert (await world.manifests.plan(bigger, restart=True)).exit_code() == 0


async def test_prune_deletes_only_what_an_apply_created(world: World) -> None:
    await world.manifests.apply(files())
    await world.services.lifecycle.create(VMSpec(name="by-hand", kernel="/boot/vmlinuz"))
    world.services.scheduler.create(
        ScheduleSpec(name="hand-sched", action="start", vm="by-hand", cron="0 1 * * *")
    )
    without_db = edited(('[[vm]]\nname = "db"\nkernel = "/boot/vmlinuz"\n', ""))
    kept = await world.manifests.plan(without_db)
    assert kept.steps == () and [str(k) for k, _ in kept.kept] == ["vm"]
    pruned = await world.manifests.apply(without_db, prune=True)
    assert ops(pruned.plan.steps) == [("vm", "delete", "db")]
    assert world.names() == {"web", "by-hand"}
    assert "hand-sched" in {s.name for s in world.services.scheduler.all()}
    rows = {(o.kind, o.name) for o in world.manifests.applied().objects}
    assert not {("vm", "db"), ("quota", "db"), ("snapshot_policy", "db")} & rows


async def test_a_vm_remade_by_hand_is_not_the_managed_one(world: World) -> None:
    await world.manifests.apply(files())
    await world.settle()
    await world.services.lifecycle.delete("db")
    await world.services.lifecycle.create(VMSpec(name="db", kernel="/boot/vmlinuz"))
    without_db = edited(('[[vm]]\nname = "db"\nkernel = "/boot/vmlinuz"\n', ""))
    p = await world.manifests.plan(without_db, prune=True)
    assert p.steps == ()  # the new db was made by hand: prune leaves it
    assert [(str(d.kind), d.name, d.field) for d in p.drift] == [("vm", "db", None)]
    await world.manifests.apply(without_db, prune=True)
    assert "db" in world.names()
    assert (await world.manifests.plan(without_db, prune=True)).drift == ()


async def test_hand_changes_are_drift_and_apply_puts_them_back(world: World) -> None:
    await world.manifests.apply(files())
    await world.services.quotas.set("db", Quota(cpu_percent=300))
    world.services.scheduler.delete("nightly")
    p = await world.manifests.plan(files())
    drift = {(str(d.kind), d.name, d.field): (d.applied, d.now) for d in p.drift}
    assert drift[("vm", "db", "quota.cpu_percent")] == (100, 300)
    assert drift[("schedule", "nightly", None)] == (None, None)
    assert ops(p.steps) == [("quota", "update", "db"), ("schedule", "create", "nightly")]
    await world.manifests.apply(files())
    assert (await world.manifests.plan(files())).drift == ()


async def test_a_vm_made_by_hand_is_taken_over(world: World) -> None:
    await world.services.lifecycle.create(VMSpec(name="db", kernel="/boot/vmlinuz"))
    p = await world.manifests.plan(files())
    db = next(s for s in p.steps if s.name == "db" and str(s.kind) == "vm")
    assert db.adopt and db.op == Op.UPDATE
    await world.manifests.apply(files())
    rows = {(o.kind, o.name) for o in world.manifests.applied().objects}
    assert ("vm", "db") in rows
    assert (await world.manifests.plan(files())).steps == ()


async def test_host_refusals_name_file_key_and_line_and_change_nothing(world: World) -> None:
    bad = HOST.replace("memory_mib = 256\n", 'memory_mib = 256\nhypervisor = "firecracker"\n')
    bad += '\n[[network]]\nname = "lan"\nsubnet = "10.77.0.0/24"\n'
    with pytest.raises(ManifestInvalid) as info:
        await world.manifests.apply(files(bad))
    problems = {(p.file, p.line, p.path): p.message for p in info.value.error.problems}
    assert "not configured" in problems[("host.toml", 10, "vm[web].hypervisor")]
    network_line = bad.splitlines().index("[[network]]") + 1
    assert "networking is not available" in problems[("host.toml", network_line, "network[lan]")]
    assert len(problems) == 2
    assert world.names() == set() and world.manifests.applied().head is None
    assert world.events(EventType.VM_CREATED) == []
    first = info.value.members["errors"][0]
    assert (first["file"], first["line"], first["field"]) == ("host.toml", 10, "vm[web].hypervisor")


async def test_a_failed_step_stops_the_apply_and_the_next_apply_carries_on(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = world.manifests.runner
    real = runner.run
    seen: list[str] = []

    async def failing(step: Step) -> str | None:
        seen.append(f"{step.kind} {step.name}")
        if str(step.kind) == "snapshot_policy" and step.name == "web":
            raise Conflict("the disk is full")
        return await real(step)

    monkeypatch.setattr(runner, "run", failing)
    with pytest.raises(ApplyFailed) as info:
        await world.manifests.apply(files())
    assert info.value.status == 409 and "step 6 of 9" in info.value.detail
    head = world.manifests.applied().head
    assert (
        head is not None
        and head.applying_hash is not None
        and "disk is full" in (head.failure or "")
    )
    assert world.events(EventType.MANIFEST_APPLY_FAILED)
    monkeypatch.setattr(runner, "run", real)
    rest = await world.manifests.plan(files())
    assert ops(rest.steps) == [
        ("snapshot_policy", "create", "web"),
        ("schedule", "create", "nightly"),
        ("schedule", "create", "web-stop"),
        ("vm", "start", "web"),
    ]
    assert rest.drift == ()  # what was done is recorded, not mistaken for hand changes
    await world.manifests.apply(files())
    assert (await world.manifests.plan(files())).steps == ()
    assert world.manifests.applied().head.applying_hash is None  # type: ignore[union-attr]


async def test_applies_run_one_at_a_time(world: World) -> None:
    first, second = await asyncio.gather(
        world.manifests.apply(files()), world.manifests.apply(files())
    )
    assert first.done == 9 and second.done == 0
    assert sorted(world.names()) == ["db", "web"]


async def test_apply_is_refused_while_the_agent_keeps_a_file_applied(world: World) -> None:
    world.manifests.watching = Path("/etc/stoker/host.toml")
    with pytest.raises(Exception, match="edit that file instead"):
        await world.manifests.apply(files())
    assert (await world.manifests.plan(files())).exit_code() == 2


# --------------------------------------------------------------------------- update_spec


async def test_update_spec_of_a_stopped_vm_takes_any_change(world: World) -> None:
    lifecycle = world.services.lifecycle
    vm = await lifecycle.create(
        VMSpec(name="app", kernel="/boot/vmlinuz", network={"mode": "none"})
    )
    bigger = vm.spec.model_copy(update={"memory_mib": 512, "labels": {"tier": "app"}})
    updated = await lifecycle.update_spec("app", bigger)
    assert updated.spec.memory_mib == 512 and updated.state == VMState.PENDING
    assert world.events(EventType.VM_UPDATED) == ["app: spec updated (memory_mib, labels)"]
    assert (await lifecycle.update_spec("app", bigger)).spec == bigger  # nothing changed
    assert len(world.events(EventType.VM_UPDATED)) == 1


async def test_update_spec_of_a_running_vm_takes_live_fields_only(world: World) -> None:
    lifecycle = world.services.lifecycle
    vm = await lifecycle.create(
        VMSpec(name="app", kernel="/boot/vmlinuz", network={"mode": "none"})
    )
    await lifecycle.start("app")
    await world.settle()
    with pytest.raises(Conflict, match="memory_mib can only change with a restart"):
        await lifecycle.update_spec("app", vm.spec.model_copy(update={"memory_mib": 512}))
    probe = {"kind": "vmm", "name": "still-there", "interval_s": 5}
    live = VMSpec.model_validate({**vm.spec.model_dump(), "labels": {"a": "b"}, "probes": [probe]})
    updated = await lifecycle.update_spec("app", live)
    assert updated.state == VMState.RUNNING and updated.spec.labels == {"a": "b"}
    assert len(world.driver.vmms) == 1  # no restart
    report = await world.services.health.report(updated)
    assert "still-there" in {p.state.name for p in report.probes}  # probes restarted at once
    with pytest.raises(Exception, match="cannot be renamed"):
        await lifecycle.update_spec("app", live.model_copy(update={"name": "other"}))


# --------------------------------------------------------------------------- the API


async def test_api_plans_applies_and_shows_the_applied_manifest(world: World) -> None:
    transport = httpx.ASGITransport(app=create_app(world.services))
    async with httpx.AsyncClient(transport=transport, base_url="http://stoker") as api:
        body = {"files": [{"name": "host.toml", "content": HOST}], "width": 60}
        planned = (await api.post("/api/v1/manifest/plan", json=body)).json()
        assert planned["exit_code"] == 2 and planned["summary"]["create"] == 8
        assert planned["text"].startswith("Plan: 8 to create, 1 to start.")
        assert all(len(line) <= 60 for line in planned["text"].splitlines())
        applied = (await api.post("/api/v1/manifest/apply", json=body)).json()
        assert applied["done"] == 9
        shown = (await api.get("/api/v1/manifest")).json()
        assert shown["manifest_hash"] == planned["manifest_hash"]
        assert shown["files"] == body["files"] and shown["applying_hash"] is None
        assert {"kind": "vm", "name": "web"}.items() <= shown["objects"][-1].items()

        broken = HOST.replace("memory_mib = 256", 'memory_mib = "lots"')
        bad = {"files": [{"name": "host.toml", "content": broken + "[[vm]]\nname = 7\n"}]}
        answer = await api.post("/api/v1/manifest/apply", json=bad)
        assert answer.status_code == 422
        assert answer.headers["content-type"] == "application/problem+json"
        errors = answer.json()["errors"]
        assert [(e["file"], e["line"], e["field"]) for e in errors] == [
            ("host.toml", 9, "vm[web].memory_mib"),
            ("host.toml", 26, "vm[2].kernel"),  # missing: the line of its [[vm]]
            ("host.toml", 27, "vm[2].name"),
        ]
        assert "nothing was changed" in answer.json()["detail"]
        again = await api.post("/api/v1/manifest/plan", json=body)
        assert again.json()["exit_code"] == 0  # the broken apply changed nothing
