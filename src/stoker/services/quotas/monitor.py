"""Watching running VMs hit their limits.

Each round samples the cgroup and VMM counters of every running VM; throttling, memory
pressure and disks at their limit become counters (per episode and per sample) and one
``quota.violation`` event per episode, so a VM held at its cap does not flood the event log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from stoker.domain.events import EventType
from stoker.domain.quota import Quota, Sample, rates, violations
from stoker.domain.states import VMState
from stoker.domain.vm import VM
from stoker.drivers.base import VMM, DriverError, Unsupported
from stoker.host.cgroups import CgroupBackend, CgroupError
from stoker.services.directory import VMDirectory
from stoker.services.events import EventBus
from stoker.services.quotas.notify import announce
from stoker.store.quotas import QuotaStore

log = logging.getLogger("stoker.quotas")


@dataclass
class Watch:
    """Monitor state for one running VM."""

    prev: Sample | None = None
    last: Sample | None = None
    usage: dict[str, float | None] = field(default_factory=dict)
    violating: set[str] = field(default_factory=set)


class QuotaMonitor:
    """One ``check_once`` round at a time; a PeriodicTask runs the rounds."""

    def __init__(
        self,
        directory: VMDirectory,
        events: EventBus,
        store: QuotaStore,
        quota_of: Callable[[str], Quota],
        cgroups_of: Callable[[str], CgroupBackend | None],
        disk_at_limit_ratio: float,
    ) -> None:
        self.directory = directory
        self.events = events
        self.store = store
        self.quota_of = quota_of
        self.cgroups_of = cgroups_of
        self.disk_at_limit_ratio = disk_at_limit_ratio
        self.watches: dict[str, Watch] = {}

    def restart(self, vm_id: str) -> None:
        """A new VMM: counters start over."""
        self.watches[vm_id] = Watch()

    def forget(self, vm_id: str) -> None:
        self.watches.pop(vm_id, None)

    def usage(self, vm_id: str) -> dict[str, Any]:
        """Rates measured over the last round (empty before the second sample)."""
        watch = self.watches.get(vm_id)
        return dict(watch.usage) if watch is not None else {}

    async def sample(self, vm: VM, vmm: VMM) -> Sample:
        loop = asyncio.get_running_loop()
        values: dict[str, int | None] = {}
        cg = self.cgroups_of(vm.id)
        if cg is not None:

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
            with contextlib.suppress(DriverError, Unsupported, TimeoutError):
                stats = await vmm.stats()
                values["disk_ops"] = sum(d.read_ops + d.write_ops for d in stats.disks)
                values["disk_bytes"] = sum(d.read_bytes + d.write_bytes for d in stats.disks)
        return Sample(at=loop.time(), **values)

    async def check_once(self) -> None:
        """One monitoring round over every running VM."""
        for vm in self.directory.all(VMState.RUNNING):
            vmm = self.directory.vmm(vm.id)
            if vmm is None:
                continue
            try:
                await self._check_vm(vm, vmm)
            except Exception:  # one VM must not stop the loop
                log.exception("quota monitoring failed", extra={"vm": vm.name})

    async def _check_vm(self, vm: VM, vmm: VMM) -> None:
        watch = self.watches.setdefault(vm.id, Watch())
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
        quota = self.quota_of(vm.id)
        now = datetime.now(UTC)
        found = violations(previous, current, quota, self.disk_at_limit_ratio)
        for violation in found:
            new_episode = violation.kind not in watch.violating
            self.store.record_violation(
                vm.id, violation.kind, new_episode, violation.amount, violation.detail, now
            )
            if new_episode:
                announce(
                    self.events,
                    vm,
                    EventType.QUOTA_VIOLATION,
                    violation.detail,
                    kind=violation.kind,
                    amount=violation.amount,
                )
        watch.violating = {v.kind for v in found}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
