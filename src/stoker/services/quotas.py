"""Per-VM quotas and rate limits: CPU cap, memory, disk IOPS and bandwidth, network.

Every limit is made to bind and then read back: a CPU cap and a memory limit on the VMM's own
cgroup, a QEMU throttle group (or Firecracker drive limiter) for disk, tc on the TAP (or
Firecracker's interface limiter) for network. A limit that does not take effect is an error
with the reason, never a silent success. Quotas are applied at every start, restart and
re-adoption (``lifecycle.on_vmm_up``) and live when changed; a monitor loop turns throttling,
memory pressure and disks at their limit into ``quota.violation`` events and counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, ValidationError

from stoker.config import AgentConfig, ConfigError
from stoker.domain.quota import (
    FIELDS,
    Enforcement,
    Quota,
    QuotaProblem,
    Sample,
    check_fits,
    enforceable_part,
    merge,
    plan,
    rates,
    sources,
    violations,
)
from stoker.domain.spec import DriveFormat, Hypervisor, NetworkMode, VMSpec
from stoker.domain.states import VMState
from stoker.domain.units import (
    DEFAULT_QEMU_OVERHEAD_BYTES,
    MiB,
    mbps_to_bytes_per_s,
    tbf_burst_bytes,
    vmm_memory_limit_bytes,
)
from stoker.domain.vm import VM
from stoker.drivers.base import VMM, DriverError, IOLimits, NotSupported
from stoker.host import netlimits
from stoker.host.cgroups import (
    DEFAULT_ROOT,
    CgroupBackend,
    CgroupError,
    backend_for,
)
from stoker.services.container import Services
from stoker.services.errors import Conflict, InvalidSpec, ServiceError
from stoker.services.lifecycle import StartVeto
from stoker.store.db import Database
from stoker.store.events import Event
from stoker.store.quotas import QuotaStore

log = logging.getLogger("stoker.quotas")


class QuotasConfig(Quota):
    """The ``[quotas]`` config section: default limits plus how they are enforced."""

    model_config = ConfigDict(extra="forbid")

    cgroup_root: Path = DEFAULT_ROOT
    cgroup_parent: str = Field(default="stoker", description="parent of the per-VM cgroups")
    memory_overhead_mib: int = Field(
        default=DEFAULT_QEMU_OVERHEAD_BYTES // MiB,
        ge=16,
        description="VMM memory above guest RAM allowed by the cgroup limit",
    )
    monitor_interval_s: float = Field(default=10.0, gt=0, le=3600)
    disk_at_limit_ratio: float = Field(default=0.9, gt=0, le=1)

    def defaults(self) -> Quota:
        return Quota(**{name: getattr(self, name) for name in FIELDS})


class QuotaInvalid(ServiceError):
    """422 listing every field that is wrong, so one answer says all there is to fix."""

    status = 422
    title = "Invalid quota"

    def __init__(self, problems: list[QuotaProblem]) -> None:
        super().__init__(
            "; ".join(f"{p.field}: {p.message}" for p in problems),
            errors=[{"field": p.field, "message": p.message} for p in problems],
        )


class QuotaApplyError(Exception):
    def __init__(self, failures: dict[str, str]) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in failures.items()))
        self.failures = failures


@dataclass
class Applied:
    """What the last application to a running VM did, per quota field."""

    at: datetime
    enforced: dict[str, str] = field(default_factory=dict)  # field -> what now binds
    failed: dict[str, str] = field(default_factory=dict)  # field -> why not
    cgroup: str | None = None


@dataclass
class _Watch:
    """Monitor state for one running VM."""

    prev: Sample | None = None
    last: Sample | None = None
    usage: dict[str, float | None] = field(default_factory=dict)
    violating: set[str] = field(default_factory=set)


# --------------------------------------------------------------------------- drive sizes


def _image_size(path: str, fmt: DriveFormat) -> tuple[int, int]:
    """(virtual size, allocated bytes) of one image; qcow2's virtual size is in its header."""
    st = os.stat(path)
    virtual = st.st_size
    if fmt == DriveFormat.QCOW2:
        with open(path, "rb") as image:
            header = image.read(32)
        if len(header) == 32 and header[:4] == b"QFI\xfb":
            virtual = int.from_bytes(header[24:32], "big")
    return virtual, st.st_blocks * 512


def drive_sizes(spec: VMSpec) -> tuple[int, int]:
    """Summed (virtual size, allocated bytes) of the VM's drives; missing files count 0."""
    virtual = allocated = 0
    for drive in spec.drives:
        with contextlib.suppress(OSError):
            v, a = _image_size(drive.path, drive.format)
            virtual += v
            allocated += a
    return virtual, allocated


def to_io_limits(quota: Quota, spec: VMSpec) -> IOLimits:
    """The limits the VMM enforces itself. Network figures only for Firecracker: QEMU's
    TAP traffic is shaped with tc by this service, and user-mode traffic cannot be."""
    firecracker = spec.hypervisor == Hypervisor.FIRECRACKER
    return IOLimits(
        disk_iops=quota.disk_iops,
        disk_bytes_per_s=quota.disk_bytes_per_s,
        net_mbps=quota.network_mbps if firecracker else None,
        net_pps=quota.network_pps if firecracker else None,
    )


# --------------------------------------------------------------------------- the service


class QuotaService:
    def __init__(self, services: Services, config: QuotasConfig, store: QuotaStore) -> None:
        self.services = services
        self.lifecycle = services.lifecycle
        self.events = services.events
        self.config = config
        self.defaults = config.defaults()
        self.store = store
        self.overhead_bytes = config.memory_overhead_mib * MiB
        self._cgroups: CgroupBackend | None = None
        self.cgroup_error: str | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        self._applied: dict[str, Applied] = {}
        self._watch: dict[str, _Watch] = {}

    # ------------------------------------------------------------------ reading quotas

    def override(self, vm_id: str) -> Quota | None:
        raw = self.store.get(vm_id)
        if raw is None:
            return None
        try:
            return Quota(**raw)
        except ValidationError:
            log.exception("stored quota is invalid; ignoring it", extra={"vm_id": vm_id})
            return None

    def effective(self, vm_id: str) -> Quota:
        return merge(self.defaults, self.override(vm_id))

    def io_limits_for(self, vm_id: str, spec: VMSpec) -> IOLimits:
        """For Firecracker's boot-time configuration (its ``limits_for`` hook)."""
        quota = self.effective(vm_id)
        return to_io_limits(enforceable_part(quota, plan(quota, spec)), spec)

    # ------------------------------------------------------------------ cgroups

    def cgroups(self) -> CgroupBackend:
        if self._cgroups is None:
            try:
                self._cgroups = backend_for(self.config.cgroup_root, self.config.cgroup_parent)
            except (CgroupError, ValueError) as exc:
                self.cgroup_error = str(exc)
                raise CgroupError(f"cgroups unusable: {exc}") from exc
        return self._cgroups

    def _place(self, vm_id: str, pid: int) -> str:
        cg = self.cgroups()
        cg.create(vm_id)
        cg.add_process(vm_id, pid)
        return str(cg.path(vm_id))

    def _remove_cgroup(self, vm_id: str) -> None:
        if self._cgroups is not None:
            with contextlib.suppress(CgroupError, ValueError, OSError):
                self._cgroups.remove(vm_id, move_strays=False)

    async def place_early(self, vm_id: str, spec: VMSpec, pid: int) -> None:
        """Right after spawn, before the guest touches its RAM: memory is charged to the
        cgroup a page is first touched in and is not moved with the process (v1 here refuses
        move_charge_at_immigrate, v2 never moves it), so only an early move makes the memory
        limit see the guest. Failures are reported by ``on_vmm_up``, which applies again.
        A VMM of no registered VM (a snapshot's throwaway verification copy) has no quota."""
        vm = self.lifecycle.vms.get(vm_id)
        if vm is None:
            return
        quota = enforceable_part(self.effective(vm_id), plan(self.effective(vm_id), spec))
        probe = Applied(at=datetime.now(UTC))
        try:
            await asyncio.to_thread(self._place, vm_id, pid)
            await asyncio.to_thread(self._apply_cgroup, vm, quota, probe)
        except (CgroupError, ValueError) as exc:
            log.warning("could not place VMM %s in its cgroup at spawn: %s", pid, exc)

    # ------------------------------------------------------------------ checks

    def check_spec(self, spec: VMSpec) -> None:
        """At create: the default quota must fit the new VM (guest RAM, drive sizes)."""
        problems = check_fits(self.defaults, spec, drive_sizes(spec)[0])
        if problems:
            p = problems[0]
            raise InvalidSpec(
                "memory_mib" if p.field == "memory_mib" else "drives",
                f"exceeds the default quota: {p.message}",
            )

    def pre_start(self, vm: VM) -> None:
        problems = check_fits(self.effective(vm.id), vm.spec, drive_sizes(vm.spec)[0])
        if problems:
            raise StartVeto("quota: " + "; ".join(f"{p.field}: {p.message}" for p in problems))

    # ------------------------------------------------------------------ applying

    def _lock(self, vm_id: str) -> asyncio.Lock:
        return self._locks.setdefault(vm_id, asyncio.Lock())

    async def on_vmm_up(self, vm: VM, vmm: VMM) -> None:
        """Every start, restart and re-adoption: into the VM's cgroup, then every limit."""
        async with self._lock(vm.id):
            quota = self.effective(vm.id)
            try:
                applied = await self._apply(vm, vmm, quota, place=True)
            except QuotaApplyError as exc:
                self.events.publish(
                    "quota.apply_failed",
                    f"{vm.name}: quota limits NOT in effect: {exc}",
                    vm.id,
                    name=vm.name,
                    failed=exc.failures,
                )
                return
            self._watch[vm.id] = _Watch()
            if applied.enforced:
                self.events.publish(
                    "quota.applied",
                    f"{vm.name}: quota applied ({', '.join(sorted(applied.enforced))})",
                    vm.id,
                    name=vm.name,
                    enforced=applied.enforced,
                )

    async def _apply(self, vm: VM, vmm: VMM, quota: Quota, place: bool = False) -> Applied:
        """Make every enforceable limit of ``quota`` bind on the running VM, then read it back.

        Fields the VM setup cannot enforce are skipped here (explicit requests for them are
        refused earlier). Raises QuotaApplyError naming each limit that did not take effect.
        """
        spec = vm.spec
        enforcement = plan(quota, spec)
        quota = enforceable_part(quota, enforcement)
        applied = Applied(at=datetime.now(UTC))
        self._applied[vm.id] = applied
        if place:
            try:
                applied.cgroup = await asyncio.to_thread(self._place, vm.id, vmm.record.pid)
            except (CgroupError, ValueError) as exc:
                self.cgroup_error = str(exc)
                reason = f"cannot put the VMM (pid {vmm.record.pid}) in its cgroup: {exc}"
                for name in ("cpu_percent", "memory_mib"):
                    if getattr(quota, name) is not None:
                        applied.failed[name] = reason
        elif self._cgroups is not None:
            applied.cgroup = str(self._cgroups.path(vm.id))
        if applied.cgroup is not None:
            await asyncio.to_thread(self._apply_cgroup, vm, quota, applied)
        await self._apply_vmm_limits(vm, vmm, quota, enforcement, applied)
        if spec.hypervisor == Hypervisor.QEMU and spec.network.mode == NetworkMode.TAP:
            await asyncio.to_thread(self._apply_tc, vm, quota, applied)
        if quota.disk_gib is not None:
            applied.enforced["disk_gib"] = enforcement.enforced["disk_gib"]
        if applied.failed:
            raise QuotaApplyError(applied.failed)
        return applied

    def _apply_cgroup(self, vm: VM, quota: Quota, applied: Applied) -> None:
        cg = self.cgroups()
        try:
            cg.set_cpu_percent(vm.id, quota.cpu_percent)
            if quota.cpu_percent is not None:
                applied.enforced["cpu_percent"] = (
                    f"{cg.mode} cgroup CPU cap {quota.cpu_percent}% of one core"
                )
        except (CgroupError, ValueError) as exc:
            _fail_or_log(applied, "cpu_percent", quota.cpu_percent, exc)
        limit = (
            vmm_memory_limit_bytes(vm.spec.memory_mib, self.overhead_bytes)
            if quota.memory_mib is not None
            else None
        )
        try:
            cg.set_memory(vm.id, max_bytes=limit, high_bytes=None)
            if limit is not None:
                applied.enforced["memory_mib"] = (
                    f"{cg.mode} cgroup memory limit {limit // MiB} MiB "
                    f"(guest {vm.spec.memory_mib} MiB + VMM overhead {self.overhead_bytes // MiB})"
                )
        except (CgroupError, ValueError) as exc:
            _fail_or_log(applied, "memory_mib", limit, exc)

    async def _apply_vmm_limits(
        self, vm: VM, vmm: VMM, quota: Quota, enforcement: Enforcement, applied: Applied
    ) -> None:
        spec = vm.spec
        limits = to_io_limits(quota, spec)
        fields = [n for n in ("disk_iops", "disk_bytes_per_s") if spec.drives]
        if spec.hypervisor == Hypervisor.FIRECRACKER and spec.network.mode == NetworkMode.TAP:
            fields += ["network_mbps", "network_pps"]
        if not fields:
            return
        try:
            await vmm.apply_io_limits(limits)
            if spec.hypervisor == Hypervisor.QEMU and spec.drives:
                await self._verify_qemu_throttle(vmm, quota)
        except (DriverError, NotSupported) as exc:
            for name in fields:
                if getattr(quota, name) is not None:
                    applied.failed[name] = str(exc)
            return
        for name in fields:
            if getattr(quota, name) is not None:
                applied.enforced[name] = f"{enforcement.enforced[name]}: {getattr(quota, name)}"

    async def _verify_qemu_throttle(self, vmm: VMM, quota: Quota) -> None:
        """Read the limits back from QEMU: the originals trusted a command that had failed."""
        execute = getattr(vmm, "execute", None)
        if execute is None:
            return
        want = {"iops": quota.disk_iops or 0, "bps": quota.disk_bytes_per_s or 0}
        for entry in await execute("query-block"):
            inserted = entry.get("inserted") or {}
            got = {k: inserted.get(k, 0) for k in want}
            if got != want:
                raise DriverError(
                    f"QEMU reports {got} on drive {entry.get('qdev') or entry.get('device')} "
                    f"after setting {want}"
                )

    def _apply_tc(self, vm: VM, quota: Quota, applied: Applied) -> None:
        tap = vm.spec.network.tap
        assert tap is not None
        try:
            if quota.network_mbps is None:
                netlimits.clear_limits(tap)
                return
            rate = mbps_to_bytes_per_s(quota.network_mbps)
            burst = tbf_burst_bytes(rate)
            shaped = netlimits.shape_tap(tap, rate, rate, burst)
            seen = netlimits.read_qdisc(tap)
        except (netlimits.NetLimitError, ValueError, OSError) as exc:
            if quota.network_mbps is not None:
                applied.failed["network_mbps"] = str(exc)
            return
        if not (shaped.guest_rx and shaped.guest_tx):
            applied.failed["network_mbps"] = f"TAP {tap} only partly shaped: {shaped.note}"
        elif seen.get("rate") != rate or seen.get("ifb", {}).get("rate") != rate:
            applied.failed["network_mbps"] = f"the kernel shows {seen} on {tap}, not {rate} B/s"
        else:
            applied.enforced["network_mbps"] = (
                f"tc tbf {rate} B/s (burst {burst} B) on {tap} and its ifb, both directions"
            )

    # ------------------------------------------------------------------ operator requests

    async def set(self, ref: str, override: Quota) -> dict[str, Any]:
        """Replace the VM's override; applied live when it runs; persisted once it binds."""
        vm = self.lifecycle.get(ref, 0)
        if override.is_empty():
            raise InvalidSpec("quota", "no limit given: set at least one field")
        new = merge(self.defaults, override)
        problems = check_fits(new, vm.spec, drive_sizes(vm.spec)[0])
        refused = plan(override, vm.spec).unenforceable
        problems += [QuotaProblem(name, reason) for name, reason in refused.items()]
        if problems:
            raise QuotaInvalid(problems)
        async with self._lock(vm.id):
            await self._apply_live(vm, old=self.effective(vm.id), new=new)
            self.store.put(vm.id, override.set_fields(), datetime.now(UTC))
        self.events.publish(
            "quota.changed",
            f"{vm.name}: quota set ({_describe(override)})",
            vm.id,
            name=vm.name,
            quota=override.set_fields(),
        )
        return self.view(self.lifecycle.get(vm.id, 0))

    async def remove(self, ref: str) -> dict[str, Any]:
        """Drop the override: the defaults apply again (live when running)."""
        vm = self.lifecycle.get(ref, 0)
        async with self._lock(vm.id):
            await self._apply_live(vm, old=self.effective(vm.id), new=self.defaults)
            existed = self.store.delete(vm.id)
        if existed:
            self.events.publish(
                "quota.removed", f"{vm.name}: quota override removed", vm.id, name=vm.name
            )
        return self.view(self.lifecycle.get(vm.id, 0))

    async def _apply_live(self, vm: VM, old: Quota, new: Quota) -> None:
        vmm = self.lifecycle.vmm(vm.id)
        if vmm is None or vm.state != VMState.RUNNING:
            return  # applied at the next start
        try:
            await self._apply(vm, vmm, new, place=vm.id not in self._applied)
        except QuotaApplyError as exc:
            with contextlib.suppress(QuotaApplyError):
                await self._apply(vm, vmm, old)
            raise QuotaNotApplied(vm.name, exc) from exc

    # ------------------------------------------------------------------ views

    def view(self, vm: VM) -> dict[str, Any]:
        override = self.override(vm.id)
        quota = merge(self.defaults, override)
        enforcement = plan(quota, vm.spec)
        virtual, allocated = drive_sizes(vm.spec)
        running = vm.state == VMState.RUNNING and self.lifecycle.vmm(vm.id) is not None
        applied = self._applied.get(vm.id) if running else None
        watch = self._watch.get(vm.id) if running else None
        usage: dict[str, Any] = {
            "disk_bytes": virtual,
            "disk_allocated_bytes": allocated,
            "guest_memory_mib": vm.spec.memory_mib,
        }
        if watch is not None:
            usage.update(watch.usage)
        if running and self._cgroups is not None:
            with contextlib.suppress(CgroupError, ValueError, OSError):
                usage["memory_bytes"] = self._cgroups.read_memory_current(vm.id)
        limits: dict[str, Any] = {}
        for name in FIELDS:
            value = getattr(quota, name)
            entry: dict[str, Any] = {
                "value": value,
                "source": sources(self.defaults, override)[name],
            }
            if value is None:
                entry["status"] = "unlimited"
            elif name in enforcement.unenforceable:
                entry["status"] = "not enforceable"
                entry["reason"] = enforcement.unenforceable[name]
            elif applied is not None and name in applied.failed:
                entry["status"] = "failed"
                entry["reason"] = applied.failed[name]
            elif applied is not None and name in applied.enforced:
                entry["status"] = "enforced"
                entry["how"] = applied.enforced[name]
            elif name == "disk_gib":
                entry["status"] = "enforced"
                entry["how"] = enforcement.enforced[name]
            elif running:
                entry["status"] = "pending"
                entry["reason"] = "being applied to the VMM that just started"
            else:
                entry["status"] = "pending"
                entry["reason"] = "applied when the VM next starts"
            limits[name] = entry
        if vm.spec.memory_mib and quota.memory_mib is not None:
            limits["memory_mib"]["vmm_limit_bytes"] = vmm_memory_limit_bytes(
                vm.spec.memory_mib, self.overhead_bytes
            )
        return {
            "vm": vm.name,
            "vm_id": vm.id,
            "state": vm.state.value,
            "override": override.set_fields() if override else {},
            "defaults": self.defaults.set_fields(),
            "effective": quota.set_fields(),
            "limits": limits,
            "applied_at": applied.at.isoformat().replace("+00:00", "Z") if applied else None,
            "cgroup": applied.cgroup if applied else None,
            "usage": usage,
            "violations": {v.kind: v.as_dict() for v in self.store.violations(vm.id)},
        }

    async def get(self, ref: str) -> dict[str, Any]:
        """The view plus what the VMM itself reports about its disk throttling right now."""
        vm = self.lifecycle.get(ref, 0)
        out = self.view(vm)
        vmm = self.lifecycle.vmm(vm.id)
        execute = getattr(vmm, "execute", None)
        if vm.state == VMState.RUNNING and execute is not None and vm.spec.drives:
            try:
                blocks = await execute("query-block")
            except DriverError as exc:
                out["observed"] = {"error": str(exc)}
            else:
                out["observed"] = {
                    "drives": [
                        {
                            "qdev": entry.get("qdev"),
                            **{
                                key: (entry.get("inserted") or {}).get(key)
                                for key in ("bps", "iops", "group")
                            },
                        }
                        for entry in blocks
                    ]
                }
        return out

    def list(self) -> list[dict[str, Any]]:
        return [self.view(vm) for vm in self.lifecycle.vms.list()]

    def violation_counts(self, vm_id: str | None = None) -> list[dict[str, Any]]:
        """For reports: every counter, with its VM id."""
        return [{"vm_id": v.vm_id, **v.as_dict()} for v in self.store.violations(vm_id)]

    # ------------------------------------------------------------------ monitoring

    async def sample(self, vm: VM, vmm: VMM) -> Sample:
        loop = asyncio.get_running_loop()
        values: dict[str, int | None] = {}
        if vm.id in self._applied and self._applied[vm.id].cgroup and self._cgroups is not None:
            cg = self._cgroups

            def read() -> None:
                with contextlib.suppress(CgroupError, ValueError, OSError):
                    cpu = cg.read_cpu_stats(vm.id)
                    values["cpu_usage_usec"] = cpu.usage_usec
                    values["cpu_throttled"] = cpu.nr_throttled
                with contextlib.suppress(CgroupError, ValueError, OSError):
                    mem = cg.read_memory_events(vm.id)
                    values["memory_failcnt"] = mem.max
                    values["memory_oom_kills"] = mem.oom_kill

            await asyncio.to_thread(read)
        if vm.spec.drives:
            with contextlib.suppress(DriverError, NotSupported, TimeoutError):
                stats = await vmm.stats()
                values["disk_ops"] = sum(d.read_ops + d.write_ops for d in stats.disks)
                values["disk_bytes"] = sum(d.read_bytes + d.write_bytes for d in stats.disks)
        return Sample(at=loop.time(), **values)

    async def check_once(self) -> None:
        """One monitoring round over every running VM."""
        for vm in self.lifecycle.vms.list(VMState.RUNNING):
            vmm = self.lifecycle.vmm(vm.id)
            if vmm is None:
                continue
            try:
                await self._check_vm(vm, vmm)
            except Exception:  # one VM must not stop the loop
                log.exception("quota monitoring failed", extra={"vm": vm.name})

    async def _check_vm(self, vm: VM, vmm: VMM) -> None:
        watch = self._watch.setdefault(vm.id, _Watch())
        current = await self.sample(vm, vmm)
        previous = watch.last
        watch.prev, watch.last = previous, current
        if previous is None:
            return
        measured = rates(previous, current)
        watch.usage = {
            "cpu_percent": _round(measured.cpu_percent),
            "disk_iops": _round(measured.disk_iops),
            "disk_bytes_per_s": _round(measured.disk_bytes_per_s),
            "window_s": round(current.at - previous.at, 3),
        }
        quota = self.effective(vm.id)
        now = datetime.now(UTC)
        found = violations(previous, current, quota, self.config.disk_at_limit_ratio)
        kinds = {v.kind for v in found}
        for violation in found:
            new_episode = violation.kind not in watch.violating
            self.store.record_violation(
                vm.id, violation.kind, new_episode, violation.amount, violation.detail, now
            )
            if new_episode:
                self.events.publish(
                    "quota.violation",
                    f"{vm.name}: {violation.detail}",
                    vm.id,
                    name=vm.name,
                    kind=violation.kind,
                    amount=violation.amount,
                )
        watch.violating = kinds

    # ------------------------------------------------------------------ events

    async def on_event(self, event: Event) -> None:
        """Forget a VM's cgroup and monitor state once its VMM is gone; its rows once deleted."""
        if event.vm_id is None:
            return
        if event.type == "vm.state" and event.data.get("to_state") in ("stopped", "error"):
            self._forget_runtime(event.vm_id)
            await asyncio.to_thread(self._remove_cgroup, event.vm_id)
        elif event.type == "vm.deleted":
            self._forget_runtime(event.vm_id)
            self.store.forget_vm(event.vm_id)
            self._locks.pop(event.vm_id, None)
            await asyncio.to_thread(self._remove_cgroup, event.vm_id)

    def _forget_runtime(self, vm_id: str) -> None:
        self._applied.pop(vm_id, None)
        self._watch.pop(vm_id, None)


class QuotaNotApplied(Conflict):
    """A limit did not take effect on the running VM; the previous quota is kept."""

    def __init__(self, name: str, exc: QuotaApplyError) -> None:
        super().__init__(
            f"quota for {name} NOT changed: it could not be applied to the running VM: {exc}",
            errors=[{"field": k, "message": v} for k, v in exc.failures.items()],
        )


class CgroupPlacingDriver:
    """Wraps a driver so every VMM it starts is in its cgroup within moments of its spawn."""

    def __init__(self, inner: Any, service: QuotaService) -> None:
        self._inner = inner
        self._service = service

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def spawn(self, vm_id: str, spec: VMSpec, paths: Any) -> Any:
        vmm = await self._inner.spawn(vm_id, spec, paths)
        await self._service.place_early(vm_id, spec, vmm.record.pid)
        return vmm

    async def restore(self, vm_id: str, spec: VMSpec, paths: Any, state: Path) -> Any:
        vmm = await self._inner.restore(vm_id, spec, paths, state)
        await self._service.place_early(vm_id, spec, vmm.record.pid)
        return vmm


class QuotaMonitor:
    """The background loop of violation monitoring."""

    def __init__(self, service: QuotaService, interval_s: float) -> None:
        self.service = service
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await self.service.check_once()
            await asyncio.sleep(self.interval_s)


def _fail_or_log(applied: Applied, name: str, value: Any, exc: Exception) -> None:
    """A limit that was asked for and failed is an error; failing to clear one is a warning."""
    if value is not None:
        applied.failed[name] = str(exc)
    else:
        log.warning("could not clear %s: %s", name, exc)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _describe(quota: Quota) -> str:
    return ", ".join(f"{k}={v}" for k, v in quota.set_fields().items())


def install(services: Services, config: AgentConfig, db: Database) -> None:
    """Register the quota service, its start hooks, its event listener and its monitor."""
    try:
        settings = QuotasConfig(**config.sections.get("quotas", {}))
    except ValidationError as exc:
        problems = "; ".join(
            f"quotas.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"invalid [quotas] configuration: {problems}") from None
    service = QuotaService(services, settings, QuotaStore(db))
    services.extra["quotas"] = service
    lifecycle = services.lifecycle
    lifecycle.on_vmm_up.append(service.on_vmm_up)
    lifecycle.pre_start.append(service.pre_start)
    create_checks = getattr(lifecycle, "create_checks", None)
    if create_checks is not None:
        create_checks.append(service.check_spec)
    services.events.add_listener(service.on_event)
    firecracker = lifecycle.drivers.get("firecracker")
    fc_config = getattr(firecracker, "config", None)
    if fc_config is not None and hasattr(fc_config, "limits_for"):
        firecracker.config = replace(fc_config, limits_for=service.io_limits_for)  # type: ignore[union-attr]
    for name, driver in list(lifecycle.drivers.items()):
        lifecycle.drivers[name] = CgroupPlacingDriver(driver, service)  # type: ignore[assignment]
    services.background.append(QuotaMonitor(service, settings.monitor_interval_s))
