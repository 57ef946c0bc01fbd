"""What each console page shows, read from the agent's services (never over HTTP).

Pages get the same wire models the API answers with (shaped by ``api.shapes``), plus the
few things only a page needs: one row per VM with its health and latest usage, and charts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from stoker import wire
from stoker.api.quota_view import quota_out
from stoker.api.resources import resources_out
from stoker.api.shapes import event_out, health_out, schedule_out, snapshot_out, vm_out
from stoker.domain.health import Health
from stoker.domain.schedules import ScheduleRecord
from stoker.domain.states import VMState, allowed_actions
from stoker.domain.units import format_size
from stoker.domain.vm import VM
from stoker.services.container import Services
from stoker.services.directory import ConsoleTail
from stoker.web.charts import RANGES, Chart, usage_chart

#: how much of the end of a VM's console its page shows
CONSOLE_TAIL_BYTES = 8192
EVENTS_SHOWN = 50
TRANSITIONS_SHOWN = 50
#: predictions the host page shows, with what they are called there
PREDICTED = {
    "memory_allocated": "memory allocated",
    "cpu_allocated": "vCPUs allocated",
    "memory_used": "memory used",
    "cpu_used": "CPU used",
    "vms_allocated": "VMs",
}


def age(seconds: float) -> str:
    """'45s', '3m', '2h05m', '4d': how long, at a glance."""
    if seconds < 60:
        return f"{max(0, int(seconds))}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m"
    if seconds < 86_400:
        return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    return f"{int(seconds // 86_400)}d"


# ---------------------------------------------------------------------------- VM list


@dataclass(frozen=True)
class VMRow:
    id: str
    name: str
    state: str
    reason: str
    since: datetime
    health: str
    health_reason: str
    cpu: str
    memory: str
    uptime: str
    restarts: int
    actions: tuple[str, ...]


def vm_row(svc: Services, vm: VM, now: datetime) -> VMRow:
    running = vm.state == VMState.RUNNING
    verdict = svc.health.store.verdict(vm.id) if running else None
    health, health_reason = Health.UNKNOWN.value, f"VM is {vm.state.value}"
    if verdict is not None:
        health, health_reason = verdict[0].value, verdict[2] or ""
    reading = svc.resources.latest.get(vm.id) if running else None
    cpu = "-"
    memory = f"{vm.spec.memory_mib} MiB guest"
    if reading is not None:
        if reading.cpu_percent is not None:
            cpu = f"{reading.cpu_percent:.1f}%"
        if reading.memory_bytes is not None:  # the VMM's resident memory: guest plus its own
            memory = f"{format_size(reading.memory_bytes)} ({vm.spec.memory_mib} MiB guest)"
    uptime = age((now - vm.state_since).total_seconds()) if running else "-"
    actions = () if vm.unreadable else tuple(a.value for a in allowed_actions(vm.state))
    return VMRow(
        id=vm.id,
        name=vm.name,
        state=vm.state.value,
        reason=vm.state_reason,
        since=vm.state_since,
        health=health,
        health_reason=health_reason,
        cpu=cpu,
        memory=memory,
        uptime=uptime,
        restarts=vm.restart_count,
        actions=actions,
    )


def vm_rows(svc: Services) -> list[VMRow]:
    now = datetime.now(UTC)
    return [vm_row(svc, vm, now) for vm in svc.directory.all()]


# ------------------------------------------------------------------------------- host


@dataclass(frozen=True)
class HostView:
    resources: wire.ResourcesOut
    charts: list[Chart]
    range_name: str


def host_view(svc: Services, range_name: str) -> HostView:
    resources = svc.resources
    range_s = RANGES[range_name]
    now_t = resources.clock().timestamp()
    samples = resources.history(range_s)
    cap = resources.capacity
    charts = [
        usage_chart(
            "host-memory",
            "memory used by VMMs",
            "bytes",
            [(s.t, s.memory_used) for s in samples],
            now_t,
            range_s,
            limit=float(cap.memory_limit_bytes),
            limit_label="capacity",
        ),
        usage_chart(
            "host-memory-allocated",
            "memory allocated",
            "bytes",
            [(s.t, s.memory_allocated) for s in samples],
            now_t,
            range_s,
            limit=float(cap.memory_limit_bytes),
            limit_label="capacity",
        ),
        usage_chart(
            "host-cpu",
            "CPU used by VMMs",
            "cores",
            [(s.t, s.cpu_used) for s in samples],
            now_t,
            range_s,
            limit=float(cap.physical_cpus),
            limit_label="CPUs",
        ),
    ]
    return HostView(resources_out(resources), charts, range_name)


# --------------------------------------------------------------------------------- VM


@dataclass(frozen=True)
class VMView:
    vm: wire.VMOut
    row: VMRow
    health: wire.HealthOut
    console: ConsoleTail
    quota: wire.QuotaOut
    snapshots: list[wire.SnapshotOut]
    schedules: list[wire.ScheduleOut]
    events: list[wire.EventOut]


def vm_charts(svc: Services, vm: VM, range_name: str, vmm_limit: float | None) -> list[Chart]:
    """CPU and memory over the range, with their trends (memory runs towards the VMM's
    memory limit when a quota sets one)."""
    resources = svc.resources
    range_s = RANGES[range_name]
    now_t = resources.clock().timestamp()
    samples = resources.vm_history(vm.id, range_s)
    return [
        usage_chart(
            "vm-cpu",
            "CPU",
            "percent",
            [(s.t, s.cpu_percent) for s in samples],
            now_t,
            range_s,
            limit=100.0 * vm.spec.vcpus,
            limit_label="vCPUs",
        ),
        usage_chart(
            "vm-memory",
            "memory (VMM resident)",
            "bytes",
            [(s.t, s.memory_bytes) for s in samples],
            now_t,
            range_s,
            limit=vmm_limit,
            limit_label="memory limit",
        ),
    ]


def vmm_memory_limit(quota: wire.QuotaOut) -> float | None:
    limit = quota.limits.get("memory_mib")
    return float(limit.vmm_limit_bytes) if limit and limit.vmm_limit_bytes else None


def targets(row: ScheduleRecord, vm: VM) -> bool:
    """Does this schedule act on ``vm`` (by name, or by a selector its labels match)?"""
    if row.vm is not None:
        return row.vm == vm.name
    if row.selector is not None:
        return all(vm.spec.labels.get(k) == v for k, v in row.selector.items())
    return False


async def vm_view(svc: Services, ref: str) -> VMView:
    vm = svc.directory.get(ref, TRANSITIONS_SHOWN)
    health = health_out(await svc.health.report(vm))
    scheduler = svc.scheduler
    events = svc.events.store.query(vm_id=vm.id, limit=EVENTS_SHOWN)
    return VMView(
        vm=vm_out(vm),
        row=vm_row(svc, vm, datetime.now(UTC)),
        health=health,
        console=svc.directory.console_tail(vm.id, CONSOLE_TAIL_BYTES),
        quota=quota_out(svc.quotas.report(vm)),
        snapshots=[snapshot_out(s) for s in reversed(svc.snapshots.all(vm.id))],
        schedules=[schedule_out(r, scheduler) for r in scheduler.all() if targets(r, vm)],
        events=[event_out(e) for e in reversed(events)],
    )
