"""The quota service on the null hypervisor (tests/fakes.py) and a cgroup v2 tree in a temp
dir: which files get which values, what a failed limit answers, persistence, and the
Firecracker mapping."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from stoker.api.quota_view import quota_out
from stoker.domain.capabilities import Capabilities
from stoker.domain.quota import Quota
from stoker.domain.spec import VMSpec
from stoker.domain.states import VMState
from stoker.domain.units import MiB
from stoker.domain.vm import VM
from stoker.drivers.base import IOLimits, ProcessRecord
from stoker.drivers.firecracker.driver import CAPABILITIES as FC_CAPS
from stoker.drivers.qemu import CAPABILITIES as QEMU_CAPS
from stoker.host.cgroups import V2Cgroups
from stoker.services.directory import VMDirectory
from stoker.services.errors import NotFound
from stoker.services.events import EventBus
from stoker.services.quotas import (
    QuotaInvalid,
    QuotaNotApplied,
    QuotasConfig,
    QuotaService,
    VMCgroups,
    to_io_limits,
)
from stoker.store.db import Database
from stoker.store.events import EventStore
from stoker.store.quotas import QuotaStore
from stoker.store.vms import VMStore
from stoker.wire import QuotaOut
from tests.fakes import FakeVMM

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def published(events: EventBus) -> list[tuple[str, str, dict[str, Any]]]:
    return [(e.type, e.message, e.data) for e in events.store.query(limit=1000)]


def v2_tree(root: Path) -> dict[Path, str]:
    """A fake cgroup2 mount: the files V2Cgroups reads exist, writes are recorded."""
    for d in (root, root / "stoker"):
        d.mkdir(parents=True, exist_ok=True)
        (d / "cgroup.controllers").write_text("cpu memory io\n")
        (d / "cgroup.subtree_control").write_text("")
    return {}


def make(tmp_path: Path, state=VMState.RUNNING, running=True, **spec_kw):
    """The real quota service over a real store, a fake VMM and a recorded cgroup v2 tree."""
    db = Database(tmp_path / "s.db")
    directory = VMDirectory(VMStore(db), tmp_path)
    spec = VMSpec(name="web", kernel="/k", **spec_kw)
    vm = VM("ab12cd34ef56ab78", "web", spec, state, "r", NOW, NOW)
    directory.store.insert(vm)
    vmm = FakeVMM(spec, ProcessRecord(4242, 1, "/x")) if running else None
    if vmm is not None:
        directory.own(vm.id, vmm)
    events = EventBus(EventStore(db))
    writes: dict[Path, str] = v2_tree(tmp_path / "cg")

    def writer(path: Path, value: str) -> None:
        writes[path] = value

    cgroups = VMCgroups(tmp_path / "cg", "stoker")
    cgroups.backend = V2Cgroups(tmp_path / "cg", "stoker", writer=writer)
    config = QuotasConfig(cgroup_root=tmp_path / "cg", memory_overhead_mib=160)
    service = QuotaService(
        directory, events, QuotaStore(db), config, capabilities_of, cgroups=cgroups
    )
    return service, vm, vmm, writes, events


def capabilities_of(spec: VMSpec) -> Capabilities:
    """What the real drivers declare."""
    return FC_CAPS if spec.hypervisor == "firecracker" else QEMU_CAPS


def view(service: QuotaService, vm: VM) -> QuotaOut:
    return quota_out(service.report(service.directory.get(vm.id, 0)))


async def test_v2_files_written_at_vmm_up(tmp_path):
    service, vm, vmm, writes, events = make(tmp_path)
    service.store.put(vm.id, {"cpu_percent": 200, "memory_mib": 128}, NOW)
    await service.vmm_up(vm, vmm)
    base = tmp_path / "cg" / "stoker" / vm.id
    assert writes[base / "cgroup.procs"] == "4242"
    assert writes[base / "cpu.max"] == "200000 100000"  # two cores, a cap
    assert writes[base / "memory.max"] == str((128 + 160) * MiB)  # never guest RAM alone
    assert writes[tmp_path / "cg" / "cgroup.subtree_control"] == "+cpu +memory +io"
    assert published(events)[-1][0] == "quota.applied"
    shown = view(service, vm)
    assert shown.limits["cpu_percent"].status == "enforced"
    assert "v2 cgroup CPU cap 200%" in (shown.limits["cpu_percent"].how or "")


async def test_set_live_applies_and_persists(tmp_path):
    service, vm, vmm, writes, _ = make(tmp_path, drives=[{"path": "/nonexistent.img"}])
    await service.vmm_up(vm, vmm)
    shown = quota_out(
        await service.set("web", Quota(cpu_percent=50, disk_iops=300, disk_bytes_per_s=10**6))
    )
    assert writes[tmp_path / "cg" / "stoker" / vm.id / "cpu.max"] == "50000 100000"
    assert vmm.limits[-1] == IOLimits(disk_iops=300, disk_bytes_per_s=10**6)
    assert shown.limits["disk_iops"].status == "enforced"
    assert service.store.get(vm.id) == {"cpu_percent": 50, "disk_iops": 300,
                                        "disk_bytes_per_s": 10**6}  # fmt: skip


async def test_failed_limit_is_an_error_and_nothing_is_saved(tmp_path):
    service, vm, vmm, _, _ = make(tmp_path, drives=[{"path": "/nonexistent.img"}])
    await service.vmm_up(vm, vmm)
    vmm.limits_error = "QMP block_set_io_throttle failed: Device 'vd0' not found"
    with pytest.raises(QuotaNotApplied) as exc:
        await service.set("web", Quota(disk_iops=300))
    assert exc.value.status == 409
    assert "NOT changed" in exc.value.detail and "not found" in exc.value.detail
    assert service.store.get(vm.id) is None


async def test_bad_quotas_are_422_with_every_field(tmp_path):
    service, *_ = make(tmp_path, memory_mib=256, network={"mode": "user"})
    with pytest.raises(QuotaInvalid) as exc:
        await service.set("web", Quota(memory_mib=128, network_mbps=10))
    fields = {e["field"] for e in exc.value.members["errors"]}
    assert fields == {"memory_mib", "network_mbps"}
    assert exc.value.status == 422
    with pytest.raises(NotFound):
        await service.set("nope", Quota(cpu_percent=10))


async def test_stopped_vm_quota_is_pending_until_start(tmp_path):
    service, _vm, _, writes, _ = make(tmp_path, state=VMState.STOPPED, running=False)
    shown = quota_out(await service.set("web", Quota(cpu_percent=30)))
    assert shown.limits["cpu_percent"].status == "pending"
    assert writes == {}
    removed = quota_out(await service.remove("web"))
    assert removed.override == {}


def test_firecracker_gets_network_limits_qemu_does_not():
    quota = Quota(disk_iops=100, disk_bytes_per_s=5_000_000, network_mbps=100, network_pps=1000)
    assert to_io_limits(quota, FC_CAPS) == IOLimits(100, 5_000_000, 100, 1000)
    assert to_io_limits(quota, QEMU_CAPS) == IOLimits(100, 5_000_000, None, None)


def test_firecracker_boot_limits_drop_what_cannot_bind(tmp_path):
    service, vm, *_ = make(tmp_path)
    service.store.put(vm.id, {"network_mbps": 10, "disk_iops": 5}, NOW)
    fc = VMSpec(name="web", kernel="/k", hypervisor="firecracker")  # no network: nothing to shape
    assert service.boot_limits(replace(vm, spec=fc), FC_CAPS) == IOLimits(disk_iops=5)


async def test_violations_counted_once_per_episode(tmp_path):
    service, vm, vmm, _, events = make(tmp_path)
    service.store.put(vm.id, {"cpu_percent": 50}, NOW)
    await service.vmm_up(vm, vmm)
    cg = tmp_path / "cg" / "stoker" / vm.id
    counters = iter([0, 10, 25, 25, 40])

    def cpu_stat() -> None:
        (cg / "cpu.stat").write_text(
            f"usage_usec 1000\nnr_periods 99\nnr_throttled {next(counters)}\n"
        )

    (cg / "memory.events").write_text("high 0\nmax 0\noom 0\noom_kill 0\n")
    for _ in range(5):
        cpu_stat()
        await service.check_once()
    count = service.store.violations(vm.id)[0]
    assert (count.kind, count.episodes, count.samples, count.total) == ("cpu", 2, 3, 40)
    kinds = [e for e in published(events) if e[0] == "quota.violation"]
    assert len(kinds) == 2 and "50%" in kinds[0][1]
