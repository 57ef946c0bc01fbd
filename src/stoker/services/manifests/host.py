"""The host as a manifest plan sees it, read through the services the API uses; and the
record of the last apply, rebuilt from the managed objects' rows.

An object counts as managed when its row's id is the live object's id: a VM deleted by hand
and made again under the same name is the operator's, not the manifest's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from stoker.domain.manifests import ManagedObject
from stoker.domain.quota import Quota
from stoker.manifest import (
    MANAGER,
    AppliedRecord,
    HostState,
    NetworkRecord,
    ScheduleState,
    SnapshotPolicySpec,
    VMRecord,
)
from stoker.manifest.plan import HostObjects
from stoker.manifest.validate import managed_network
from stoker.services.lifecycle import Lifecycle
from stoker.services.manifests.ledger import resolved
from stoker.services.networks import NetworkService
from stoker.services.quotas import QuotaService
from stoker.services.scheduler import Scheduler
from stoker.services.snapshots import SnapshotService

#: (kind, name) of a managed object -> its row
Rows = Mapping[tuple[str, str], ManagedObject]


@dataclass(frozen=True)
class Host:
    """The host now, and the id of every object in it by (kind, name)."""

    state: HostState
    ids: dict[tuple[str, str], str]


@dataclass(frozen=True)
class HostServices:
    """The services a manifest reads the host through and changes it with: what the
    reader and the step runner both hold."""

    lifecycle: Lifecycle
    quotas: QuotaService
    snapshots: SnapshotService
    scheduler: Scheduler
    networks: NetworkService


class HostReader(HostServices):
    def read(self, rows: Rows) -> Host:
        ids: dict[tuple[str, str], str] = {}

        def manager(kind: str, name: str, object_id: str) -> str | None:
            ids[(kind, name)] = object_id
            row = rows.get((kind, name))
            return MANAGER if row is not None and row.object_id == object_id else None

        vms = []
        for vm in self.lifecycle.directory.all():
            policy = self.snapshots.get_policy(vm.id)
            vms.append(
                VMRecord(
                    spec=vm.spec,
                    state=vm.state,
                    quota=self.quotas.override(vm.id),
                    snapshot_policy=_policy(policy.retention, policy.interval),
                    warm_start=bool(vm.spec.warm_start),
                    network_name=managed_network(vm.spec),
                    managed_by=manager("vm", vm.name, vm.id),
                )
            )
        schedules = [
            ScheduleState(
                name=row.name,
                action=row.action,
                cron=row.cron,
                tz=row.tz,
                grace_s=row.grace_s,
                vm=row.vm,
                selector=row.selector,
                spread_s=row.spread_s,
                enabled=row.enabled,
                options=dict(row.options),
                managed_by=manager("schedule", row.name, row.id),
            )
            for row in self.scheduler.all()
            if row.name is not None  # a manifest names every schedule it has
        ]
        networks = [
            NetworkRecord(
                net.name,
                net.subnet,
                net.isolation.value,
                manager("network", net.name, net.id),
            )
            for net in (view.record for view in self.networks.all())
        ]
        state = HostState(
            vms=tuple(sorted(vms, key=lambda v: v.name)),
            schedules=tuple(sorted(schedules, key=lambda s: s.name)),
            networks=tuple(sorted(networks, key=lambda n: n.name)),
            schedule_tz=self.scheduler.default_tz,
            schedule_grace_s=self.scheduler.config.grace_s,
        )
        return Host(state, ids)


def last_applied(manifest_hash: str | None, rows: Rows, now: HostState) -> AppliedRecord | None:
    """What the applies so far left on the objects they manage (None: never applied); a
    change an interrupted apply left pending counts when the object has it."""
    if manifest_hash is None and not rows:
        return None
    settled = {(r.kind, r.name): r.applied for r in resolved(rows, HostObjects.of(now))}
    vms = []
    for (kind, name), applied in settled.items():
        if kind != "vm" or applied is None:
            continue
        quota = settled.get(("quota", name))
        policy = settled.get(("snapshot_policy", name))
        vms.append(
            replace(
                VMRecord.from_dict(applied),
                quota=Quota.model_validate(quota) if quota else None,
                snapshot_policy=SnapshotPolicySpec.model_validate(policy) if policy else None,
                managed_by=MANAGER,
            )
        )
    schedules = [
        ScheduleState.from_dict(applied)
        for (kind, _), applied in settled.items()
        if kind == "schedule" and applied is not None
    ]
    networks = [
        NetworkRecord.from_dict(applied)
        for (kind, _), applied in settled.items()
        if kind == "network" and applied is not None
    ]
    state = HostState(tuple(vms), tuple(schedules), tuple(networks))
    return AppliedRecord(manifest_hash or "", state)


def _policy(retention: str | None, interval: str | None) -> SnapshotPolicySpec | None:
    if retention is None and interval is None:
        return None
    return SnapshotPolicySpec(retention=retention, interval=interval)
