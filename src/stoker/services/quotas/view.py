"""The quota view the API and CLI show, shaped from what the service gathered.

For each limit: its value, where it comes from and whether it binds right now, and if it does
not, why (not enforceable on this VM setup, failed, or pending until the VMM is up). No I/O.
"""

from __future__ import annotations

from typing import Any

from stoker.domain.quota import FIELDS, Enforcement, Quota, ViolationCount, merge, plan, sources
from stoker.domain.units import vmm_memory_limit_bytes
from stoker.domain.vm import VM
from stoker.services.quotas.enforce import Applied


def limit_entry(
    name: str,
    value: Any,
    source: str,
    enforcement: Enforcement,
    applied: Applied | None,
    running: bool,
) -> dict[str, Any]:
    """One limit's value, source and status, with ``how`` it binds or the ``reason`` not."""
    entry: dict[str, Any] = {"value": value, "source": source}
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
    return entry


def quota_view(
    vm: VM,
    *,
    defaults: Quota,
    override: Quota | None,
    applied: Applied | None,
    running: bool,
    usage: dict[str, Any],
    violations: list[ViolationCount],
    overhead_bytes: int,
) -> dict[str, Any]:
    """The whole answer of ``GET /api/v1/vms/{ref}/quota`` (without ``observed``)."""
    quota = merge(defaults, override)
    enforcement = plan(quota, vm.spec)
    source = sources(defaults, override)
    limits = {
        name: limit_entry(name, getattr(quota, name), source[name], enforcement, applied, running)
        for name in FIELDS
    }
    if vm.spec.memory_mib and quota.memory_mib is not None:
        limits["memory_mib"]["vmm_limit_bytes"] = vmm_memory_limit_bytes(
            vm.spec.memory_mib, overhead_bytes
        )
    return {
        "vm": vm.name,
        "vm_id": vm.id,
        "state": vm.state.value,
        "override": override.set_fields() if override else {},
        "defaults": defaults.set_fields(),
        "effective": quota.set_fields(),
        "limits": limits,
        "applied_at": applied.at.isoformat().replace("+00:00", "Z") if applied else None,
        "cgroup": applied.cgroup if applied else None,
        "usage": usage,
        "violations": {v.kind: v.as_dict() for v in violations},
    }


def observed_drives(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What QEMU's ``query-block`` says about each drive's throttling."""
    return [
        {
            "qdev": entry.get("qdev"),
            **{key: (entry.get("inserted") or {}).get(key) for key in ("bps", "iops", "group")},
        }
        for entry in blocks
    ]
