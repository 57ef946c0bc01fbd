"""What each key in etcd holds (the layout is in ``keys.py``), as validated JSON.

Whatever is read from etcd is input like an API request: anyone with etcd access could have
written it, so every record is parsed by a strict model and a record that does not parse is
reported and skipped, never half-used.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from stoker.domain import cron
from stoker.domain.capacity import NodeCapacity
from stoker.domain.networks import NetworkSpec
from stoker.domain.spec import VMSpec
from stoker.domain.states import VMState
from stoker.services.scheduler.config import ZoneName
from stoker.wire.cluster import CLUSTER_LABEL as CLUSTER_LABEL  # the records' vocabulary
from stoker.wire.cluster import PlacementRules as PlacementRules

log = logging.getLogger("stoker.cluster")

Desired = Literal["running", "stopped"]
Policy = Literal["binpack", "spread"]
NODE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    def dump(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


R = TypeVar("R", bound=Record)


def load(model: type[R], value: bytes, key: str) -> R | None:
    """The record, or None (logged) when the stored value is not one."""
    try:
        return model.model_validate_json(value)
    except ValidationError as exc:
        log.warning("ignoring malformed cluster record %s: %s", key, exc.errors()[:3])
        return None


def now_utc() -> datetime:
    return datetime.now(UTC)


class CreatedRecord(Record):
    """A named object created once (VMs, networks, schedules): who made it and when, for
    the loser of a create race and for ``show``."""

    created_by: str = Field(pattern=NODE_NAME_PATTERN)
    created_at: datetime


class VMRecord(CreatedRecord):
    """``vms/<name>``: what the operator asked for. Durable; created once per name."""

    spec: VMSpec
    desired: Desired = "running"
    placement: PlacementRules = Field(default_factory=PlacementRules)
    #: true: may be started elsewhere when its node is lost; false: never moved; null: moved
    #: only when it has no writable drive
    stateless: bool | None = None
    #: restart requests (cluster schedules): its node restarts a running copy once per bump
    restarts: int | None = Field(default=None, ge=1, le=2**62)


class PlacementRecord(Record):
    """``placements/<name>``: the scheduler's decision. ``node`` None: nothing fits yet."""

    node: str | None = Field(default=None, pattern=NODE_NAME_PATTERN)
    #: the create revision of the VM record this decision is for
    incarnation: int = Field(ge=1)
    summary: str = Field(max_length=2000)
    #: why the VM is not where it should be (node lost and VM not movable, drain blocked)
    note: str | None = Field(default=None, max_length=2000)
    previous: str | None = Field(default=None, pattern=NODE_NAME_PATTERN)
    decided_by: str = Field(pattern=NODE_NAME_PATTERN)
    decided_at: datetime


class OwnerRecord(Record):
    """``owners/<name>``: bound to the owner's lease; only its holder may run the VM."""

    node: str = Field(pattern=NODE_NAME_PATTERN)
    lease: int = Field(ge=1)
    incarnation: int = Field(ge=1)
    since: datetime


class StatusRecord(Record):
    """``status/<name>``: what the node running (or holding) the VM observed."""

    node: str = Field(pattern=NODE_NAME_PATTERN)
    incarnation: int = Field(ge=1)
    state: VMState
    reason: str = Field(max_length=2000)
    since: datetime
    reported_at: datetime
    #: the VM record's ``restarts`` this node's copy has satisfied (by a restart or a start)
    restarts: int | None = Field(default=None, ge=1, le=2**62)


class CapacityRecord(Record):
    physical_cpus: int = Field(ge=1, le=65_536)
    memory_bytes: int = Field(ge=0, le=2**60)
    max_vms: int = Field(ge=0, le=100_000)
    cpu_overcommit: float = Field(gt=0, le=100)
    memory_headroom: float = Field(ge=0, lt=1)

    @classmethod
    def of(cls, cap: NodeCapacity) -> CapacityRecord:
        return cls(
            physical_cpus=cap.physical_cpus,
            memory_bytes=cap.memory_bytes,
            max_vms=cap.max_vms,
            cpu_overcommit=cap.cpu_overcommit,
            memory_headroom=cap.memory_headroom,
        )

    def capacity(self) -> NodeCapacity:
        return NodeCapacity(
            physical_cpus=self.physical_cpus,
            memory_bytes=self.memory_bytes,
            max_vms=self.max_vms,
            cpu_overcommit=self.cpu_overcommit,
            memory_headroom=self.memory_headroom,
        )


class NodeInfo(Record):
    """``nodes/<name>``: durable, refreshed by the node; stays when the node is lost."""

    name: str = Field(pattern=NODE_NAME_PATTERN)
    capacity: CapacityRecord
    labels: dict[str, str] = Field(default_factory=dict, max_length=32)
    address: str | None = Field(default=None, max_length=255)
    version: str = Field(max_length=64)
    started_at: datetime


class AliveRecord(Record):
    """``alive/<name>``: bound to the node's lease; absent means the node is lost."""

    lease: int = Field(ge=1)
    since: datetime


class CandidateRecord(Record):
    """``election/scheduler/<lease>``: a scheduler candidate, bound to its node's lease."""

    node: str = Field(pattern=NODE_NAME_PATTERN)


class CordonRecord(Record):
    """``cordoned/<name>``: no new placements; ``drain`` also moves its VMs away."""

    drain: bool = False
    reason: str = Field(default="", max_length=500)
    at: datetime


ScheduleAction = Literal["start", "stop", "restart"]
ScheduleOutcome = Literal["ok", "no-targets", "missed"]
OBJECT_NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"


class ScheduleRecord(CreatedRecord):
    """``schedules/<name>``: a cron schedule of an action on cluster VMs. Durable; created
    once per name. Its create revision tells its run record from an older namesake's."""

    cron: str = Field(max_length=256)
    tz: ZoneName = Field(max_length=64)
    action: ScheduleAction
    vm: str | None = Field(default=None, pattern=OBJECT_NAME_PATTERN)
    selector: dict[str, str] | None = Field(default=None, max_length=16)
    #: a fire later than this is recorded as missed instead of run
    grace_s: float = Field(default=600.0, ge=0, le=7 * 86400)

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        return cron.validate_cron(v)


class ScheduleRunRecord(Record):
    """``schedule-runs/<name>``: the latest fire already handled (fires after it are due)
    and what happened then. Written only by the leader, in the same transaction as the
    run's own writes, so a fire is handled once across leader changes."""

    #: the create revision of the schedule record this belongs to
    schedule_revision: int = Field(ge=1)
    last_fire_at: datetime
    #: the fire this outcome is about (for "missed": the latest one missed)
    fire_at: datetime
    action: ScheduleAction
    outcome: ScheduleOutcome
    #: the VMs the run targeted, and those whose record it changed
    vms: list[str] = Field(default_factory=list, max_length=128)
    changed: list[str] = Field(default_factory=list, max_length=128)
    missed: int = Field(default=0, ge=0, le=100_000)
    message: str = Field(max_length=2000)
    node: str = Field(pattern=NODE_NAME_PATTERN)
    at: datetime


class NetworkRecord(CreatedRecord):
    """``networks/<name>``: a cluster network, the same definition as a local network create
    (``NetworkSpec``); every node makes a local copy. Durable; created once per name, and its
    create revision tells a node's copy of it from one of an older namesake."""

    spec: NetworkSpec


class NodeNetworksRecord(Record):
    """``node-networks/<node>``: which cluster networks are ready on the node (name -> the
    create revision of the definition its copy matches) and why the others are not. Durable;
    written by the node only when it changes. The scheduler places a VM on network N only on
    nodes listing N at N's current revision."""

    ready: dict[str, int] = Field(default_factory=dict, max_length=4096)
    problems: dict[str, str] = Field(default_factory=dict, max_length=4096)
    at: datetime

    @field_validator("problems")
    @classmethod
    def _short(cls, v: dict[str, str]) -> dict[str, str]:
        if any(len(reason) > 2000 for reason in v.values()):
            raise ValueError("a problem is at most 2000 characters")
        return v


def movable(record: VMRecord) -> tuple[bool, str]:
    """May the VM start on another node when its node is gone? And why (or why not)."""
    if record.stateless is True:
        return True, "declared stateless"
    if record.stateless is False:
        return False, "declared stateful (stateless: false)"
    writable = [d.path for d in record.spec.drives if not d.read_only]
    if writable:
        return False, (
            f"writable drive {writable[0]} is local to its node (declare stateless: true if it "
            "is scratch space or on storage every node reaches)"
        )
    return True, "no writable drive (kernel, initrd and read-only drives only)"
