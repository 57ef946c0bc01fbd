"""The quota service with fakes for the VMM and a cgroup v2 tree in a temp dir: which files
get which values, what a failed limit answers, persistence, and the Firecracker mapping."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from stoker.domain.quota import Quota
from stoker.domain.spec import VMSpec
from stoker.domain.states import VMState
from stoker.domain.units import MiB
from stoker.domain.vm import VM
from stoker.drivers.base import DriverError, IOLimits, ProcessRecord, VMMStats
from stoker.host.cgroups import V2Cgroups
from stoker.services.errors import NotFound
from stoker.services.quotas import (
    QuotaInvalid,
    QuotaNotApplied,
    QuotasConfig,
    QuotaService,
    to_io_limits,
)
from stoker.store.db import Database
from stoker.store.quotas import QuotaStore

NOW = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass
class FakeVMM:
    record: ProcessRecord = field(default_factory=lambda: ProcessRecord(4242, 1, "/x"))
    child: Any = None
    applied: list[IOLimits] = field(default_factory=list)
    fail: bool = False

    async def apply_io_limits(self, limits: IOLimits) -> None:
        if self.fail:
            raise DriverError("QMP block_set_io_throttle failed: Device 'vd0' not found")
        self.applied.append(limits)

    async def execute(self, cmd: str, args: Any = None) -> Any:
        last = self.applied[-1] if self.applied else IOLimits()
        return [{"qdev": "vd0", "inserted": {"bps": last.disk_bytes_per_s or 0,
                                             "iops": last.disk_iops or 0}}]  # fmt: skip

    async def stats(self) -> VMMStats:
        return VMMStats()


class FakeVMs:
    def __init__(self, vms: list[VM]) -> None:
        self.vms = vms

    def all(self, state: VMState | None = None) -> list[VM]:
        return [v for v in self.vms if state is None or v.state == state]


class FakeLifecycle:
    def __init__(self, vm: VM, vmm: FakeVMM | None) -> None:
        self.vm, self._vmm = vm, vmm
        self.vms = FakeVMs([vm])
        self.drivers: dict[str, Any] = {}
        self.on_vmm_up: list[Any] = []
        self.pre_start: list[Any] = []

    def get(self, ref: str, transitions: int = 0) -> VM:
        if ref not in (self.vm.id, self.vm.name):
            raise NotFound(f"no VM named or with id {ref!r}")
        return self.vm

    def vmm(self, vm_id: str) -> FakeVMM | None:
        return self._vmm


class FakeEvents:
    def __init__(self) -> None:
        self.published: list[tuple[str, str, dict[str, Any]]] = []

    def publish(self, type: str, message: str, vm_id: str | None = None, **data: Any) -> None:
        self.published.append((type, message, data))


@dataclass
class FakeServices:
    lifecycle: FakeLifecycle
    events: FakeEvents
    extra: dict[str, Any] = field(default_factory=dict)
    background: list[Any] = field(default_factory=list)


def v2_tree(root: Path) -> dict[Path, str]:
    """A fake cgroup2 mount: the files V2Cgroups reads exist, writes are recorded."""
    for d in (root, root / "stoker"):
        d.mkdir(parents=True, exist_ok=True)
        (d / "cgroup.controllers").write_text("cpu memory io\n")
        (d / "cgroup.subtree_control").write_text("")
    return {}


def make(tmp_path: Path, state=VMState.RUNNING, running=True, **spec_kw):
    vm = VM("ab12cd34ef56ab78", "web", VMSpec(name="web", kernel="/k", **spec_kw), state,
            "r", NOW, NOW)  # fmt: skip
    vmm = FakeVMM() if running else None
    services = FakeServices(FakeLifecycle(vm, vmm), FakeEvents())
    config = QuotasConfig(cgroup_root=tmp_path / "cg", memory_overhead_mib=160)
    service = QuotaService(services, config, QuotaStore(Database(tmp_path / "s.db")))  # type: ignore[arg-type]
    writes: dict[Path, str] = v2_tree(tmp_path / "cg")

    def writer(path: Path, value: str) -> None:
        writes[path] = value

    service._cgroups = V2Cgroups(tmp_path / "cg", "stoker", writer=writer)
    return service, vm, vmm, writes, services


async def test_v2_files_written_at_vmm_up(tmp_path):
    service, vm, vmm, writes, services = make(tmp_path)
    service.store.put(vm.id, {"cpu_percent": 200, "memory_mib": 128}, NOW)
    await service.on_vmm_up(vm, vmm)
    base = tmp_path / "cg" / "stoker" / vm.id
    assert writes[base / "cgroup.procs"] == "4242"
    assert writes[base / "cpu.max"] == "200000 100000"  # two cores, a cap
    assert writes[base / "memory.max"] == str((128 + 160) * MiB)  # never guest RAM alone
    assert writes[tmp_path / "cg" / "cgroup.subtree_control"] == "+cpu +memory +io"
    assert services.events.published[-1][0] == "quota.applied"
    view = service.view(vm)
    assert view["limits"]["cpu_percent"]["status"] == "enforced"
    assert "v2 cgroup CPU cap 200%" in view["limits"]["cpu_percent"]["how"]


async def test_set_live_applies_and_persists(tmp_path):
    service, vm, vmm, writes, _ = make(tmp_path, drives=[{"path": "/nonexistent.img"}])
    await service.on_vmm_up(vm, vmm)
    view = await service.set("web", Quota(cpu_percent=50, disk_iops=300, disk_bytes_per_s=10**6))
    assert writes[tmp_path / "cg" / "stoker" / vm.id / "cpu.max"] == "50000 100000"
    assert vmm.applied[-1] == IOLimits(disk_iops=300, disk_bytes_per_s=10**6)
    assert view["limits"]["disk_iops"]["status"] == "enforced"
    assert service.store.get(vm.id) == {"cpu_percent": 50, "disk_iops": 300,
                                        "disk_bytes_per_s": 10**6}  # fmt: skip


async def test_failed_limit_is_an_error_and_nothing_is_saved(tmp_path):
    service, vm, vmm, _, _ = make(tmp_path, drives=[{"path": "/nonexistent.img"}])
    await service.on_vmm_up(vm, vmm)
    vmm.fail = True
    with pytest.raises(QuotaNotApplied) as exc:
        await service.set("web", Quota(disk_iops=300))
    assert exc.value.status == 409
    assert "NOT changed" in exc.value.detail and "not found" in exc.value.detail
    assert service.store.get(vm.id) is None


async def test_bad_quotas_are_422_with_every_field(tmp_path):
    service, *_ = make(tmp_path, memory_mib=256, network={"mode": "user"})
    with pytest.raises(QuotaInvalid) as exc:
        await service.set("web", Quota(memory_mib=128, network_mbps=10))
    fields = {e["field"] for e in exc.value.extra["errors"]}
    assert fields == {"memory_mib", "network_mbps"}
    assert exc.value.status == 422
    with pytest.raises(NotFound):
        await service.set("nope", Quota(cpu_percent=10))


async def test_stopped_vm_quota_is_pending_until_start(tmp_path):
    service, _vm, _, writes, _ = make(tmp_path, state=VMState.STOPPED, running=False)
    view = await service.set("web", Quota(cpu_percent=30))
    assert view["limits"]["cpu_percent"]["status"] == "pending"
    assert writes == {}
    removed = await service.remove("web")
    assert removed["override"] == {}


def test_firecracker_gets_network_limits_qemu_does_not():
    quota = Quota(disk_iops=100, disk_bytes_per_s=5_000_000, network_mbps=100, network_pps=1000)
    fc = VMSpec(name="f", kernel="/k", hypervisor="firecracker",
                network={"mode": "tap", "tap": "t0"})  # fmt: skip
    assert to_io_limits(quota, fc) == IOLimits(100, 5_000_000, 100, 1000)
    qemu = VMSpec(name="q", kernel="/k", network={"mode": "tap", "tap": "t0"})
    assert to_io_limits(quota, qemu) == IOLimits(100, 5_000_000, None, None)


def test_firecracker_boot_limits_drop_what_cannot_bind(tmp_path):
    service, vm, *_ = make(tmp_path)
    service.store.put(vm.id, {"network_mbps": 10, "disk_iops": 5}, NOW)
    fc = VMSpec(name="web", kernel="/k", hypervisor="firecracker")  # no network: nothing to shape
    assert service.io_limits_for(vm.id, fc) == IOLimits(disk_iops=5)


async def test_violations_counted_once_per_episode(tmp_path):
    service, vm, vmm, _, services = make(tmp_path)
    service.store.put(vm.id, {"cpu_percent": 50}, NOW)
    await service.on_vmm_up(vm, vmm)
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
    kinds = [e for e in services.events.published if e[0] == "quota.violation"]
    assert len(kinds) == 2 and "50%" in kinds[0][1]
