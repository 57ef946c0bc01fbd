"""The quota service: what operators and the lifecycle ask of the quota capability.

It decides (which quota is in effect, whether it fits the VM, when to apply it) and keeps the
per-VM lock that serialises changes; placing VMMs in cgroups, making limits bind and watching
for violations are delegated to :mod:`.placement`, :mod:`.enforce` and :mod:`.monitor`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from stoker.domain.events import Event, EventType
from stoker.domain.quota import (
    Quota,
    QuotaProblem,
    check_fits,
    enforceable_part,
    merge,
    plan,
)
from stoker.domain.spec import VMSpec
from stoker.domain.states import VMState
from stoker.domain.vm import VM
from stoker.drivers.base import VMM, DriverError, IOLimits
from stoker.host.cgroups import CgroupBackend, CgroupError
from stoker.services.container import Services
from stoker.services.errors import InvalidSpec
from stoker.services.lifecycle import StartVeto
from stoker.services.quotas.drives import drive_sizes
from stoker.services.quotas.enforce import Enforcer, to_io_limits
from stoker.services.quotas.errors import (
    QuotaApplyError,
    QuotaInvalid,
    QuotaNotApplied,
    joined,
    problem_pairs,
)
from stoker.services.quotas.monitor import QuotaMonitor
from stoker.services.quotas.notify import announce
from stoker.services.quotas.placement import VMCgroups
from stoker.services.quotas.settings import QuotasConfig
from stoker.services.quotas.view import observed_drives, quota_view
from stoker.store.quotas import QuotaStore

log = logging.getLogger("stoker.quotas")


class QuotaService:
    """Registered as ``services.extra["quotas"]``; the API routes and lifecycle hooks call it."""

    def __init__(self, services: Services, config: QuotasConfig, store: QuotaStore) -> None:
        self.services = services
        self.lifecycle = services.lifecycle
        self.events = services.events
        self.config = config
        self.defaults = config.defaults()
        self.store = store
        self.overhead_bytes = config.overhead_bytes
        self.cgroups = VMCgroups(config.cgroup_root, config.cgroup_parent)
        self.enforcer = Enforcer(self.cgroups, self.overhead_bytes)
        self.monitor = QuotaMonitor(
            self.lifecycle,
            self.events,
            store,
            quota_of=self.effective,
            cgroups_of=self.enforcer.placed_cgroups,
            disk_at_limit_ratio=config.disk_at_limit_ratio,
        )
        self._locks: dict[str, asyncio.Lock] = {}

    @property
    def _cgroups(self) -> CgroupBackend | None:
        """The cgroup backend once opened; unit tests put one on a fake tree here."""
        return self.cgroups.backend

    @_cgroups.setter
    def _cgroups(self, backend: CgroupBackend | None) -> None:
        self.cgroups.backend = backend

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

    # ------------------------------------------------------------------ lifecycle hooks

    def check_spec(self, spec: VMSpec) -> None:
        """At create: the default quota must fit the new VM (guest RAM, drive sizes)."""
        problems = _misfits(self.defaults, spec)
        if problems:
            p = problems[0]
            raise InvalidSpec(
                "memory_mib" if p.field == "memory_mib" else "drives",
                f"exceeds the default quota: {p.message}",
            )

    def pre_start(self, vm: VM) -> None:
        problems = _misfits(self.effective(vm.id), vm.spec)
        if problems:
            raise StartVeto("quota: " + joined(problem_pairs(problems)))

    async def place_early(self, vm_id: str, spec: VMSpec, pid: int) -> None:
        """Right after spawn (see :mod:`.placement`). A VMM of no registered VM (a snapshot's
        throwaway verification copy) has no quota."""
        vm = self.lifecycle.vms.get(vm_id)
        if vm is None:
            return
        await self.enforcer.place_early(vm, spec, self.effective(vm_id), pid)

    async def on_vmm_up(self, vm: VM, vmm: VMM) -> None:
        """Every start, restart and re-adoption: into the VM's cgroup, then every limit."""
        async with self._lock(vm.id):
            try:
                applied = await self.enforcer.apply(vm, vmm, self.effective(vm.id), place=True)
            except QuotaApplyError as exc:
                announce(
                    self.events,
                    vm,
                    EventType.QUOTA_APPLY_FAILED,
                    f"quota limits NOT in effect: {exc}",
                    failed=exc.failures,
                )
                return
            self.monitor.restart(vm.id)
            if applied.enforced:
                announce(
                    self.events,
                    vm,
                    EventType.QUOTA_APPLIED,
                    f"quota applied ({', '.join(sorted(applied.enforced))})",
                    enforced=applied.enforced,
                )

    async def on_event(self, event: Event) -> None:
        """Forget a VM's cgroup and monitor state once its VMM is gone; its rows once deleted."""
        vm_id = event.vm_id
        if vm_id is None:
            return
        if event.type == EventType.VM_STATE and event.data.get("to_state") in ("stopped", "error"):
            self._forget_runtime(vm_id)
        elif event.type == EventType.VM_DELETED:
            self._forget_runtime(vm_id)
            self.store.forget_vm(vm_id)
            self._locks.pop(vm_id, None)
        else:
            return
        await asyncio.to_thread(self.cgroups.remove, vm_id)

    def _forget_runtime(self, vm_id: str) -> None:
        self.enforcer.forget(vm_id)
        self.monitor.forget(vm_id)

    def _lock(self, vm_id: str) -> asyncio.Lock:
        return self._locks.setdefault(vm_id, asyncio.Lock())

    # ------------------------------------------------------------------ operator requests

    async def set(self, ref: str, override: Quota) -> dict[str, Any]:
        """Replace the VM's override; applied live when it runs; persisted once it binds."""
        vm = self.lifecycle.get(ref, 0)
        if override.is_empty():
            raise InvalidSpec("quota", "no limit given: set at least one field")
        new = merge(self.defaults, override)
        problems = _misfits(new, vm.spec)
        refused = plan(override, vm.spec).unenforceable
        problems += [QuotaProblem(name, reason) for name, reason in refused.items()]
        if problems:
            raise QuotaInvalid(problems)
        async with self._lock(vm.id):
            await self._apply_live(vm, old=self.effective(vm.id), new=new)
            self.store.put(vm.id, override.set_fields(), datetime.now(UTC))
        announce(
            self.events,
            vm,
            EventType.QUOTA_CHANGED,
            f"quota set ({_describe(override)})",
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
            announce(self.events, vm, EventType.QUOTA_REMOVED, "quota override removed")
        return self.view(self.lifecycle.get(vm.id, 0))

    async def _apply_live(self, vm: VM, old: Quota, new: Quota) -> None:
        """Apply ``new`` to a running VM; if it does not bind, put ``old`` back and refuse."""
        vmm = self.lifecycle.vmm(vm.id)
        if vmm is None or vm.state != VMState.RUNNING:
            return  # applied at the next start
        try:
            await self.enforcer.apply(vm, vmm, new, place=vm.id not in self.enforcer.last)
        except QuotaApplyError as exc:
            with contextlib.suppress(QuotaApplyError):
                await self.enforcer.apply(vm, vmm, old)
            raise QuotaNotApplied(vm.name, exc) from exc

    # ------------------------------------------------------------------ views

    def view(self, vm: VM) -> dict[str, Any]:
        running = vm.state == VMState.RUNNING and self.lifecycle.vmm(vm.id) is not None
        return quota_view(
            vm,
            defaults=self.defaults,
            override=self.override(vm.id),
            applied=self.enforcer.last.get(vm.id) if running else None,
            running=running,
            usage=self._usage(vm, running),
            violations=self.store.violations(vm.id),
            overhead_bytes=self.overhead_bytes,
        )

    def _usage(self, vm: VM, running: bool) -> dict[str, Any]:
        virtual, allocated = drive_sizes(vm.spec)
        usage: dict[str, Any] = {
            "disk_bytes": virtual,
            "disk_allocated_bytes": allocated,
            "guest_memory_mib": vm.spec.memory_mib,
        }
        if running:
            usage.update(self.monitor.usage(vm.id))
            if self.cgroups.backend is not None:
                with contextlib.suppress(CgroupError, ValueError, OSError):
                    usage["memory_bytes"] = self.cgroups.backend.read_memory_current(vm.id)
        return usage

    async def get(self, ref: str) -> dict[str, Any]:
        """The view plus what the VMM itself reports about its disk throttling right now."""
        vm = self.lifecycle.get(ref, 0)
        out = self.view(vm)
        execute = getattr(self.lifecycle.vmm(vm.id), "execute", None)
        if vm.state == VMState.RUNNING and execute is not None and vm.spec.drives:
            try:
                blocks = await execute("query-block")
            except DriverError as exc:
                out["observed"] = {"error": str(exc)}
            else:
                out["observed"] = {"drives": observed_drives(blocks)}
        return out

    def all(self) -> list[dict[str, Any]]:
        return [self.view(vm) for vm in self.lifecycle.vms.all()]

    def violation_counts(self, vm_id: str | None = None) -> list[dict[str, Any]]:
        """For reports: every counter, with its VM id."""
        return [{"vm_id": v.vm_id, **v.as_dict()} for v in self.store.violations(vm_id)]

    async def check_once(self) -> None:
        """One monitoring round (the background loop calls this)."""
        await self.monitor.check_once()


def _misfits(quota: Quota, spec: VMSpec) -> list[QuotaProblem]:
    """What about this VM (guest RAM, drive sizes on disk) already breaks ``quota``."""
    return check_fits(quota, spec, drive_sizes(spec)[0])


def _describe(quota: Quota) -> str:
    return ", ".join(f"{k}={v}" for k, v in quota.set_fields().items())
