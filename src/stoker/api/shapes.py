"""From what the services hand back to the wire models the API answers with.

Pure mappings, kept out of the wire package so that it needs nothing but the domain, and out
of the services so that they know nothing of HTTP.
"""

from __future__ import annotations

from typing import Any

from stoker import wire
from stoker.domain.events import Event
from stoker.domain.health import ProbeState
from stoker.domain.schedules import RunRecord, ScheduleRecord
from stoker.domain.snapshots import SnapshotRecord
from stoker.domain.spec import Probe
from stoker.domain.states import allowed_actions
from stoker.domain.vm import VM
from stoker.services.directory import VMMLiveness
from stoker.services.health import HealthReport
from stoker.services.networks import NetworkingStatus, NetworkView
from stoker.services.scheduler import Scheduler, zone
from stoker.services.snapshots import Policy, PruneItem, PruneResult
from stoker.services.warmstart import BootSnapshot

# ----------------------------------------------------------------------------------- VMs


def boot_snapshot_out(snapshot: BootSnapshot | None) -> wire.BootSnapshotOut | None:
    if snapshot is None:
        return None
    return wire.BootSnapshotOut(
        ready=True,
        size_bytes=snapshot.size_bytes,
        created_at=snapshot.created_at,
        key=snapshot.key,
    )


def vm_out(vm: VM, boot_snapshot: BootSnapshot | None = None) -> wire.VMOut:
    process = None
    if vm.process:
        process = wire.ProcessOut(pid=vm.process.pid, accel=vm.process.accel)
    return wire.VMOut(
        id=vm.id,
        name=vm.name,
        state=vm.state,
        state_reason=vm.state_reason,
        state_since=vm.state_since,
        created_at=vm.created_at,
        # an unreadable record: only a deletion acts on it
        allowed_actions=["delete"]
        if vm.unreadable is not None
        else [a.value for a in allowed_actions(vm.state)],
        process=process,
        restart=wire.RestartInfo(
            count=vm.restart_count,
            last_restart_at=vm.last_restart_at,
            next_retry_at=vm.next_retry_at,
        ),
        spec=vm.spec,
        transitions=[
            wire.TransitionOut(
                from_state=t.from_state, to_state=t.to_state, reason=t.reason, at=t.at
            )
            for t in vm.transitions
        ],
        boot_snapshot=boot_snapshot_out(boot_snapshot),
    )


def liveness_out(liveness: VMMLiveness) -> wire.VMMLivenessOut:
    return wire.VMMLivenessOut(
        process_alive=liveness.process_alive,
        control_socket=liveness.control_socket,
        vmm_status=liveness.vmm_status,
    )


def probe_out(state: ProbeState, probe: Probe | None) -> wire.ProbeStatusOut:
    timing: dict[str, Any] = {}
    if probe is not None:
        timing = {
            "interval_s": probe.interval_s,
            "timeout_s": probe.timeout_s,
            "failure_threshold": probe.failure_threshold,
            "success_threshold": probe.success_threshold,
        }
    return wire.ProbeStatusOut(
        name=state.name,
        kind=state.kind,
        status=state.status.value,
        consecutive_failures=state.consecutive_failures,
        consecutive_successes=state.consecutive_successes,
        last_message=state.last_message,
        last_error=state.last_error,
        last_at=state.last_at,
        last_ok_at=state.last_ok_at,
        checks=state.checks,
        failures=state.failures,
        history=[
            wire.ProbeResultOut(ok=r.ok, message=r.message, at=r.at, duration_s=r.duration_s)
            for r in state.history
        ],
        **timing,
    )


def health_out(report: HealthReport) -> wire.HealthOut:
    return wire.HealthOut(
        vm=report.vm.name,
        state=report.vm.state,
        health=report.health.value,
        vmm=liveness_out(report.vmm),
        probes=[probe_out(p.state, p.probe) for p in report.probes],
        consecutive_failures=report.consecutive_failures,
        last_error=report.last_error,
        since=report.since,
        reason=report.reason,
    )


def event_out(event: Event) -> wire.EventOut:
    return wire.EventOut.model_validate(event)


# ------------------------------------------------------------------------------ snapshots


def snapshot_out(s: SnapshotRecord, manifest: dict[str, Any] | None = None) -> wire.SnapshotOut:
    v = s.verified
    files = None
    if manifest is not None:
        files = [
            wire.FileOut(name=name, size=info["size"], sha256=info["sha256"])
            for name, info in sorted(manifest.get("files", {}).items())
        ]
    return wire.SnapshotOut(
        id=s.id,
        vm_id=s.vm_id,
        vm_name=s.vm_name,
        created_at=s.created,
        kind=s.kind,
        tags=list(s.tags),
        protected=s.protected,
        with_memory=s.with_memory,
        size_bytes=s.size_bytes,
        pause_s=s.pause_s,
        last_verification=wire.VerificationOut(**vars(v)) if v else None,
        files=files,
    )


def policy_out(p: Policy) -> wire.PolicyOut:
    return wire.PolicyOut(**vars(p))


def prune_item_out(item: PruneItem) -> wire.PruneItemOut:
    return wire.PruneItemOut(
        id=item.id, created_at=item.created, reasons=list(item.reasons), size_bytes=item.size_bytes
    )


def prune_out(r: PruneResult) -> wire.PruneOut:
    return wire.PruneOut(
        vm_id=r.vm_id,
        vm_name=r.vm_name,
        policy=r.policy,
        timezone=r.timezone,
        dry_run=r.dry_run,
        keep=[prune_item_out(i) for i in r.keep],
        remove=[prune_item_out(i) for i in r.remove],
        freed_bytes=r.freed_bytes,
    )


# ------------------------------------------------------------------------------ schedules


def run_out(run: RunRecord) -> wire.RunOut:
    return wire.RunOut(**vars(run))


def schedule_out(row: ScheduleRecord, scheduler: Scheduler) -> wire.ScheduleOut:
    nxt = scheduler.next_fire(row)
    running = scheduler.store.running(row.id)
    last = scheduler.store.runs(row.id, limit=1)
    return wire.ScheduleOut(
        **vars(row),
        next_fire_at=nxt,
        next_fire_local=nxt.astimezone(zone(row.tz)).isoformat() if nxt else None,
        running_run_id=running.id if running else None,
        last_run=run_out(last[0]) if last else None,
    )


# ------------------------------------------------------------------------------- networks


def network_out(view: NetworkView) -> wire.NetworkOut:
    net = view.record
    return wire.NetworkOut(
        id=net.id,
        name=net.name,
        subnet=net.subnet,
        gateway=net.gateway,
        isolation=net.isolation,
        ipv6_subnet=net.ipv6_subnet,
        bridge=net.bridge,
        uplink=net.uplink,
        managed_by=net.managed_by,
        created_at=net.created_at,
        pool_size=view.pool_size,
        addresses_used=len(view.leases),
        dnsmasq_pid=view.dnsmasq_pid,
        dnsmasq_restarts=view.dnsmasq_restarts,
        leases=[
            wire.LeaseOut(
                vm_id=item.lease.vm_id,
                vm_name=item.vm_name,
                vm_state=item.vm_state,
                address=item.lease.address,
                mac=item.lease.mac,
                since=item.lease.created_at,
            )
            for item in view.leases
        ],
        warnings=list(view.warnings),
    )


def networking_out(status: NetworkingStatus) -> wire.NetworkingOut:
    return wire.NetworkingOut(
        available=status.available,
        reason=status.reason,
        default_network=status.default_network,
        default_subnet=status.default_subnet,
        default_modes=dict(status.default_modes),
    )
