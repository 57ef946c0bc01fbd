"""The quota service: what operators and the lifecycle ask of the quota capability.

It decides (which quota is in effect, whether it fits the VM, when to apply it) and keeps the
per-VM lock that serialises changes; placing VMMs in cgroups, making limits bind and watching
for violations are delegated to :mod:`.placement`, :mod:`.enforce` and :mod:`.monitor`.

For the lifecycle it is a create check (a new VM must fit the default quota), a start guard
(the effective quota must fit), a spawn observer (the VMM goes into its cgroup before the guest
touches its RAM), a VMM observer (every limit applied and read back once the VMM is up) and the
source of the limits a VMM takes only at boot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from stoker.domain.capabilities import Capabilities
from stoker.domain.events import Event, EventType
from stoker.domain.quota import (
    Enforcement,
    Quota,
    QuotaProblem,
    ViolationCount,
    check_fits,
    enforceable_part,
    merge,
    plan,
)
from stoker.domain.spec import VMSpec
from stoker.domain.states import VMState
from stoker.domain.vm import VM
from stoker.drivers.base import VMM, DriverError, DriveThrottle, IOLimits, Unsupported
from stoker.host.cgroups import CgroupError
from stoker.services.directory import VMDirectory
from stoker.services.errors import InvalidSpec, StartVeto
from stoker.services.events import EventBus
from stoker.services.quotas.config import QuotasConfig
from stoker.services.quotas.drives import drive_sizes
from stoker.services.quotas.enforce import Applied, CapabilitiesOf, Enforcer, to_io_limits
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
from stoker.store.quotas import QuotaStore

log = logging.getLogger("stoker.quotas")


@dataclass(frozen=True)
class QuotaReport:
    """Everything the quota view of one VM is made from (the API shapes it)."""

    vm: VM
    defaults: Quota
    override: Quota | None
    enforcement: Enforcement
    applied: Applied | None
    running: bool
    usage: dict[str, Any]
    violations: list[ViolationCount]
    overhead_bytes: int
    #: what the VMM reports in force on its drives now, or why it could not say
    observed: tuple[DriveThrottle, ...] | None = None
    observed_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def effective(self) -> Quota:
        return merge(self.defaults, self.override)


class QuotaService:
    def __init__(
        self,
        directory: VMDirectory,
        events: EventBus,
        store: QuotaStore,
        config: QuotasConfig,
        capabilities_of: CapabilitiesOf,
        cgroups: VMCgroups | None = None,
    ) -> None:
        self.directory = directory
        self.events = events
        self.config = config
        self.defaults = config.defaults()
        self.store = store
        self.capabilities_of = capabilities_of
        self.overhead_bytes = config.overhead_bytes
        self.cgroups = cgroups or VMCgroups(config.cgroup_root, config.cgroup_parent)
        self.enforcer = Enforcer(self.cgroups, self.overhead_bytes, capabilities_of)
        self.monitor = QuotaMonitor(
            directory,
            events,
            store,
            quota_of=self.effective,
            cgroups_of=self.enforcer.placed_cgroups,
            disk_at_limit_ratio=config.disk_at_limit_ratio,
        )
        self._locks: dict[str, asyncio.Lock] = {}

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

    def boot_limits(self, vm: VM, capabilities: Capabilities) -> IOLimits:
        """The limits a VMM takes in its boot configuration (Firecracker's rate limiters)."""
        quota = self.effective(vm.id)
        return to_io_limits(
            enforceable_part(quota, plan(quota, vm.spec, capabilities)), capabilities
        )

    # ------------------------------------------------------------------ the lifecycle's calls

    def check_create(self, spec: VMSpec) -> None:
        """At create: the default quota must fit the new VM (guest RAM, drive sizes)."""
        problems = _misfits(self.defaults, spec)
        if problems:
            p = problems[0]
            raise InvalidSpec(
                "memory_mib" if p.field == "memory_mib" else "drives",
                f"exceeds the default quota: {p.message}",
            )

    async def before_start(self, vm: VM) -> None:
        problems = _misfits(self.effective(vm.id), vm.spec)
        if problems:
            raise StartVeto("quota: " + joined(problem_pairs(problems)))

    async def vmm_spawned(self, vm: VM, pid: int) -> None:
        """Right after spawn (see :mod:`.placement`): into the VM's cgroup with its CPU and
        memory limits, before the guest touches its RAM."""
        await self.enforcer.place_early(vm, vm.spec, self.effective(vm.id), pid)

    async def vmm_up(self, vm: VM, vmm: VMM) -> None:
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
        if event.type == EventType.VM_STATE and event.data.get("to_state") in (
            "stopped",
            "error",
        ):
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

    async def set(self, ref: str, override: Quota) -> QuotaReport:
        """Replace the VM's override; applied live when it runs; persisted once it binds."""
        vm = self.directory.get(ref, 0)
        if override.is_empty():
            raise InvalidSpec("quota", "no limit given: set at least one field")
        new = merge(self.defaults, override)
        problems = _misfits(new, vm.spec)
        refused = plan(override, vm.spec, self.capabilities_of(vm.spec)).unenforceable
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
        return self.report(self.directory.get(vm.id, 0))

    async def remove(self, ref: str) -> QuotaReport:
        """Drop the override: the defaults apply again (live when running)."""
        vm = self.directory.get(ref, 0)
        async with self._lock(vm.id):
            await self._apply_live(vm, old=self.effective(vm.id), new=self.defaults)
            existed = self.store.delete(vm.id)
        if existed:
            announce(self.events, vm, EventType.QUOTA_REMOVED, "quota override removed")
        return self.report(self.directory.get(vm.id, 0))

    async def _apply_live(self, vm: VM, old: Quota, new: Quota) -> None:
        """Apply ``new`` to a running VM; if it does not bind, put ``old`` back and refuse."""
        vmm = self.directory.vmm(vm.id)
        if vmm is None or vm.state != VMState.RUNNING:
            return  # applied at the next start
        try:
            await self.enforcer.apply(vm, vmm, new, place=vm.id not in self.enforcer.last)
        except QuotaApplyError as exc:
            with contextlib.suppress(QuotaApplyError):
                await self.enforcer.apply(vm, vmm, old)
            raise QuotaNotApplied(vm.name, exc) from exc

    # ------------------------------------------------------------------ reports

    def report(self, vm: VM) -> QuotaReport:
        running = vm.state == VMState.RUNNING and self.directory.vmm(vm.id) is not None
        override = self.override(vm.id)
        return QuotaReport(
            vm=vm,
            defaults=self.defaults,
            override=override,
            enforcement=plan(
                merge(self.defaults, override), vm.spec, self.capabilities_of(vm.spec)
            ),
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

    async def get(self, ref: str) -> QuotaReport:
        """The report plus what the VMM itself says about its disk throttling right now."""
        vm = self.directory.get(ref, 0)
        report = self.report(vm)
        vmm = self.directory.vmm(vm.id)
        if vm.state != VMState.RUNNING or vmm is None or not vm.spec.drives:
            return report
        try:
            observed = await vmm.io_limits_in_force()
        except (DriverError, Unsupported) as exc:
            return _replace(report, observed_error=str(exc))
        return _replace(report, observed=observed)

    def all(self) -> list[QuotaReport]:
        return [self.report(vm) for vm in self.directory.all()]

    def violation_counts(self, vm_id: str | None = None) -> list[dict[str, Any]]:
        """For reports: every counter, with its VM id."""
        return [{"vm_id": v.vm_id, **v.as_dict()} for v in self.store.violations(vm_id)]

    async def check_once(self) -> None:
        """One monitoring round (the background loop calls this)."""
        await self.monitor.check_once()


def _replace(report: QuotaReport, **changes: Any) -> QuotaReport:
    from dataclasses import replace

    return replace(report, **changes)


def _misfits(quota: Quota, spec: VMSpec) -> list[QuotaProblem]:
    """What about this VM (guest RAM, drive sizes on disk) already breaks ``quota``."""
    return check_fits(quota, spec, drive_sizes(spec)[0])


def _describe(quota: Quota) -> str:
    return ", ".join(f"{k}={v}" for k, v in quota.set_fields().items())
