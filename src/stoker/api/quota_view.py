"""The quota view the API and CLI show, shaped from what the quota service gathered.

For each limit: its value, where it comes from and whether it binds right now, and if it does
not, why (not enforceable on this VM setup, failed, or pending until the VMM is up). No I/O.
"""

from __future__ import annotations

from stoker import wire
from stoker.domain.quota import FIELDS, Enforcement, ViolationCount, sources
from stoker.domain.units import vmm_memory_limit_bytes
from stoker.services.quotas import Applied, QuotaReport


def limit_entry(
    name: str,
    value: float | None,
    source: str,
    enforcement: Enforcement,
    applied: Applied | None,
    running: bool,
) -> wire.LimitOut:
    """One limit's value, source and status, with ``how`` it binds or the ``reason`` not."""
    if value is None:
        return wire.LimitOut.model_validate(
            {"value": None, "source": source, "status": "unlimited"}
        )
    status: str
    how = reason = None
    if name in enforcement.unenforceable:
        status, reason = "not enforceable", enforcement.unenforceable[name]
    elif applied is not None and name in applied.failed:
        status, reason = "failed", applied.failed[name]
    elif applied is not None and name in applied.enforced:
        status, how = "enforced", applied.enforced[name]
    elif name == "disk_gib":
        status, how = "enforced", enforcement.enforced[name]
    elif running:
        status, reason = "pending", "being applied to the VMM that just started"
    else:
        status, reason = "pending", "applied when the VM next starts"
    return wire.LimitOut.model_validate(
        {"value": value, "source": source, "status": status, "how": how, "reason": reason}
    )


def violation_out(v: ViolationCount) -> wire.ViolationOut:
    return wire.ViolationOut(
        kind=v.kind,
        episodes=v.episodes,
        samples=v.samples,
        total=v.total,
        first_at=v.first_at,
        last_at=v.last_at,
        last_detail=v.last_detail,
    )


def quota_out(report: QuotaReport) -> wire.QuotaOut:
    """The whole answer of ``GET /api/v1/vms/{ref}/quota``."""
    vm = report.vm
    quota = report.effective
    source = sources(report.defaults, report.override)
    limits = {
        name: limit_entry(
            name,
            getattr(quota, name),
            source[name],
            report.enforcement,
            report.applied,
            report.running,
        )
        for name in FIELDS
    }
    if vm.spec.memory_mib and quota.memory_mib is not None:
        limits["memory_mib"].vmm_limit_bytes = vmm_memory_limit_bytes(
            vm.spec.memory_mib, report.overhead_bytes
        )
    observed = None
    if report.observed is not None:
        observed = wire.ObservedOut(
            drives=[
                wire.DriveThrottleOut(
                    device=d.device, iops=d.iops, bytes_per_s=d.bytes_per_s, group=d.group
                )
                for d in report.observed
            ]
        )
    elif report.observed_error is not None:
        observed = wire.ObservedOut(error=report.observed_error)
    applied = report.applied
    return wire.QuotaOut(
        vm=vm.name,
        vm_id=vm.id,
        state=vm.state,
        override=report.override.set_fields() if report.override else {},
        defaults=report.defaults.set_fields(),
        effective=quota.set_fields(),
        limits=limits,
        applied_at=applied.at if applied else None,
        cgroup=applied.cgroup if applied else None,
        usage=report.usage,
        violations={v.kind: violation_out(v) for v in report.violations},
        observed=observed,
    )
