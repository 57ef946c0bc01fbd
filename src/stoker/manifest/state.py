"""The host as a plan sees it: plain typed records, one per VM, schedule and network.

The wiring fills these from the services (VM list, quota overrides, snapshot policies,
schedule rows, networks); the plan only compares them. The same records describe what
an apply leaves behind (:func:`stoker.manifest.plan.state_after`), which apply stores as the
:class:`AppliedRecord` that the next plan compares against to find drift.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from stoker.domain.quota import Quota
from stoker.domain.spec import VMSpec
from stoker.domain.states import VMState
from stoker.manifest.model import SnapshotPolicySpec

#: the ``managed_by`` marker an apply writes on every object it creates or takes over
MANAGER = "manifest"


@dataclass(frozen=True)
class VMRecord:
    spec: VMSpec
    state: VMState = VMState.PENDING
    #: the VM's own quota override (the agent's configured defaults are not part of it)
    quota: Quota | None = None
    snapshot_policy: SnapshotPolicySpec | None = None
    warm_start: bool = False
    network_name: str | None = None
    #: who created it: MANAGER for an apply, None for an operator by hand
    managed_by: str | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.model_dump(mode="json"),
            "state": str(self.state),
            "quota": self.quota.set_fields() if self.quota else None,
            "snapshot_policy": self.snapshot_policy.model_dump() if self.snapshot_policy else None,
            "warm_start": self.warm_start,
            "network_name": self.network_name,
            "managed_by": self.managed_by,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VMRecord:
        return cls(
            spec=VMSpec.model_validate(data["spec"]),
            state=VMState(data.get("state", "pending")),
            quota=Quota.model_validate(data["quota"]) if data.get("quota") else None,
            snapshot_policy=(
                SnapshotPolicySpec.model_validate(data["snapshot_policy"])
                if data.get("snapshot_policy")
                else None
            ),
            warm_start=bool(data.get("warm_start", False)),
            network_name=data.get("network_name"),
            managed_by=data.get("managed_by"),
        )


@dataclass(frozen=True)
class ScheduleState:
    """A schedule as the scheduler stores it: zone, grace and options filled in."""

    name: str
    action: str
    cron: str
    tz: str
    grace_s: float
    vm: str | None = None
    selector: dict[str, str] | None = None
    spread_s: float = 0.0
    enabled: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    managed_by: str | None = None

    def values(self) -> dict[str, Any]:
        """What a plan compares (everything but the name and the marker)."""
        return {
            "action": self.action,
            "vm": self.vm,
            "selector": self.selector,
            "cron": self.cron,
            "tz": self.tz,
            "spread_s": self.spread_s,
            "grace_s": self.grace_s,
            "enabled": self.enabled,
            "options": self.options,
        }

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.values(), "managed_by": self.managed_by}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScheduleState:
        return cls(**data)


@dataclass(frozen=True)
class NetworkRecord:
    name: str
    subnet: str
    isolation: str = "isolated"
    managed_by: str | None = None

    def values(self) -> dict[str, Any]:
        return {"subnet": self.subnet, "isolation": self.isolation}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.values(), "managed_by": self.managed_by}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NetworkRecord:
        return cls(**data)


@dataclass(frozen=True)
class HostState:
    """Everything on the host a manifest can describe, plus the scheduler defaults a
    schedule without ``tz`` or ``grace_s`` gets (so that desired and stored compare equal)."""

    vms: tuple[VMRecord, ...] = ()
    schedules: tuple[ScheduleState, ...] = ()
    networks: tuple[NetworkRecord, ...] = ()
    schedule_tz: str = "UTC"
    schedule_grace_s: float = 600.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "vms": [vm.to_dict() for vm in self.vms],
            "schedules": [s.to_dict() for s in self.schedules],
            "networks": [n.to_dict() for n in self.networks],
            "schedule_tz": self.schedule_tz,
            "schedule_grace_s": self.schedule_grace_s,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HostState:
        return cls(
            vms=tuple(VMRecord.from_dict(v) for v in data.get("vms", ())),
            schedules=tuple(ScheduleState.from_dict(s) for s in data.get("schedules", ())),
            networks=tuple(NetworkRecord.from_dict(n) for n in data.get("networks", ())),
            schedule_tz=data.get("schedule_tz", "UTC"),
            schedule_grace_s=float(data.get("schedule_grace_s", 600.0)),
        )

    def managed_only(self) -> HostState:
        """The objects an apply owns: what an :class:`AppliedRecord` keeps."""
        return replace(
            self,
            vms=tuple(v for v in self.vms if v.managed_by == MANAGER),
            schedules=tuple(s for s in self.schedules if s.managed_by == MANAGER),
            networks=tuple(n for n in self.networks if n.managed_by == MANAGER),
        )


@dataclass(frozen=True)
class AppliedRecord:
    """What the last apply left: the manifest's hash and the values it set on each object it
    manages. Drift is a difference between this and the host now. Apply may also update it
    object by object as it goes, so a crash mid-apply does not read as drift later."""

    manifest_hash: str
    state: HostState

    def to_dict(self) -> dict[str, Any]:
        return {"manifest_hash": self.manifest_hash, "state": self.state.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AppliedRecord:
        return cls(str(data["manifest_hash"]), HostState.from_dict(data["state"]))
