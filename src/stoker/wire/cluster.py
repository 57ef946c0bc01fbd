"""Cluster mode as the API shows it: cluster VMs, nodes, placement explanations."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from stoker.domain.cron import validate_cron
from stoker.domain.networks import Isolation, NetworkSpec
from stoker.domain.spec import CONTROL_RE, LABEL_KEY_RE, MAX_LABELS, NAME_PATTERN, VMSpec

__all__ = [
    "CLUSTER_LABEL",
    "ClusterNetworkCreate",
    "ClusterNetworkNodeOut",
    "ClusterNetworkOut",
    "ClusterOut",
    "ClusterScheduleCreate",
    "ClusterScheduleOut",
    "ClusterScheduleRunOut",
    "ClusterVMCreate",
    "ClusterVMOut",
    "ClusterVMPage",
    "ClusterVMSummary",
    "CordonIn",
    "ExplainOut",
    "NodeOut",
    "PlacementRules",
    "VerdictOut",
]

#: the label a node puts on its local copy of a cluster VM (reserved: requests may not set it)
CLUSTER_LABEL = "stoker.cluster/incarnation"

NodeState = Literal["ready", "cordoned", "draining", "lost"]


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class PlacementRules(_Input):
    """Where a cluster VM may go."""

    selector: dict[str, str] = Field(
        default_factory=dict,
        max_length=16,
        description="node labels the node must have, all of them, with these values",
    )
    anti_affinity: str | None = Field(
        default=None,
        pattern=NAME_PATTERN,
        description="at most one VM of this group per node",
    )
    policy: Literal["binpack", "spread"] | None = Field(
        default=None, description="null: the cluster's policy ([cluster] policy)"
    )

    @model_validator(mode="after")
    def _selector(self) -> PlacementRules:
        for key, value in self.selector.items():
            if not key or len(key) > 63 or len(value) > 256:
                raise ValueError("selector keys are 1-63 characters, values at most 256")
        return self

    def dump(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


class ClusterVMCreate(_Input):
    """POST /api/v1/cluster/vms: a VM the cluster places, runs and moves."""

    spec: VMSpec
    placement: PlacementRules = Field(default_factory=PlacementRules)
    stateless: bool | None = Field(
        default=None,
        description="true: may start on another node when its node is lost (scratch disks, "
        "or disks every node reaches); false: never moved; null: moved only when it has no "
        "writable drive",
    )
    start: bool = Field(default=True, description="desired state running (else stopped)")

    @model_validator(mode="after")
    def _labels(self) -> ClusterVMCreate:
        if CLUSTER_LABEL in self.spec.labels:
            raise ValueError(f"spec.labels: {CLUSTER_LABEL} is reserved for stoker's own use")
        if len(self.spec.labels) >= MAX_LABELS:
            raise ValueError(
                f"spec.labels: a cluster VM has at most {MAX_LABELS - 1} labels (its node adds one)"
            )
        return self


class CordonIn(_Input):
    reason: str = Field(default="", max_length=500, pattern=r"^[^\x00-\x1f\x7f]*$")


class ClusterVMSummary(BaseModel):
    name: str
    desired: Literal["running", "stopped"]
    node: str | None = Field(description="where it is placed; null: nothing fits yet")
    state: str = Field(description="as its node reports it; 'unplaced' or 'unknown' otherwise")
    reason: str
    note: str | None = Field(description="why it is not where it should be")
    vcpus: int
    memory_mib: int


class ClusterVMOut(ClusterVMSummary):
    incarnation: int = Field(description="the revision that created it (a new one per re-create)")
    spec: VMSpec
    placement: PlacementRules
    stateless: bool | None
    movable: bool
    movable_reason: str
    node_state: NodeState | None
    owner: str | None = Field(description="the node holding its owner record now")
    since: datetime | None
    placement_summary: str | None
    previous_node: str | None
    created_by: str
    created_at: datetime


class ClusterVMPage(BaseModel):
    items: list[ClusterVMSummary]
    #: pass as ``after`` for the next page; null on the last page
    next_after: str | None
    total: int
    revision: int


class CapacityView(BaseModel):
    physical_cpus: int
    memory_mib: int
    max_vms: int
    cpu_overcommit: float
    memory_headroom: float
    vcpu_limit: int
    memory_limit_mib: int


class AllocatedView(BaseModel):
    vms: int
    vcpus: int
    memory_mib: int


class NodeOut(BaseModel):
    name: str
    state: NodeState
    address: str | None
    labels: dict[str, str]
    capacity: CapacityView
    allocated: AllocatedView
    vms: list[str]
    cordon_reason: str | None
    scheduler: bool = Field(description="this node runs the active scheduler")
    version: str
    started_at: datetime


class ClusterOut(BaseModel):
    node: str
    standing: str = Field(
        description="this node's lease: alive, at-risk, hold (etcd down everywhere), fenced, "
        "expired"
    )
    registered: bool
    lease: str | None
    fence_remaining_s: float
    endpoints: list[str]
    last_error: str | None
    conflict: str | None
    leader: str | None
    revision: int
    nodes: int
    nodes_lost: int
    vms: int


class VerdictOut(BaseModel):
    node: str
    eligible: bool
    chosen: bool
    reasons: list[str]
    score: float | None


class ExplainOut(BaseModel):
    vm: str
    placed_on: str | None
    would_place_on: str | None
    policy: str
    summary: str
    note: str | None
    verdicts: list[VerdictOut]
    text: str


# -- cluster schedules ---------------------------------------------------------------------------

ClusterScheduleAction = Literal["start", "stop", "restart"]


class ClusterScheduleCreate(_Input):
    """POST /api/v1/cluster/schedules: a cron schedule of start/stop/restart on cluster VMs,
    run once per fire in the cluster by the active scheduler."""

    name: str = Field(pattern=NAME_PATTERN)
    cron: str = Field(max_length=256, description="5-field cron expression or @hourly/@daily/...")
    tz: str | None = Field(
        default=None,
        max_length=64,
        description="IANA zone the cron times are in; default: the answering node's",
    )
    action: ClusterScheduleAction
    vm: str | None = Field(default=None, pattern=NAME_PATTERN, description="one cluster VM")
    selector: dict[str, str] | None = Field(
        default=None, max_length=16, description="every cluster VM with all these labels"
    )
    grace_s: float = Field(
        default=600.0, ge=0, le=7 * 86400, description="a fire later than this is missed"
    )

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        return validate_cron(v)

    @model_validator(mode="after")
    def _target(self) -> ClusterScheduleCreate:
        if (self.vm is None) == (self.selector is None):
            raise ValueError("give exactly one target: vm (a cluster VM) or selector (labels)")
        for key, value in (self.selector or {}).items():
            if not LABEL_KEY_RE.fullmatch(key):
                raise ValueError(f"selector: label key {key!r} must match {LABEL_KEY_RE.pattern}")
            if len(value) > 256 or CONTROL_RE.search(value):
                raise ValueError(f"selector: label {key!r} value must be one line of at most 256")
        if self.selector == {}:
            raise ValueError("selector: give at least one label, or target a vm instead")
        return self


class ClusterScheduleRunOut(BaseModel):
    fire_at: datetime
    at: datetime = Field(description="when the run was committed")
    node: str = Field(description="the scheduler that ran it")
    action: str
    outcome: Literal["ok", "no-targets", "missed"]
    vms: list[str] = Field(description="the VMs it targeted")
    changed: list[str] = Field(description="the VMs whose desired state it changed")
    missed: int
    message: str


class ClusterScheduleOut(BaseModel):
    name: str
    cron: str
    tz: str
    action: str
    vm: str | None
    selector: dict[str, str] | None
    grace_s: float
    created_by: str
    created_at: datetime
    next_fire_at: datetime | None
    last_fire_at: datetime | None = Field(description="the latest fire already handled")
    last_run: ClusterScheduleRunOut | None
    revision: int


# -- cluster networks ----------------------------------------------------------------------------

#: POST /api/v1/cluster/networks: the same body, with the same checks, as a local network create
ClusterNetworkCreate = NetworkSpec

NetworkNodeState = Literal["ready", "pending", "conflict", "error", "lost"]


class ClusterNetworkNodeOut(BaseModel):
    node: str
    state: NetworkNodeState = Field(
        description="ready: its local copy matches; pending: being made; conflict: a local "
        "network of that name the cluster does not manage, or a different copy, is there; "
        "error: it cannot be made there; lost: the node is lost"
    )
    reason: str


class ClusterNetworkOut(BaseModel):
    name: str
    subnet: str
    isolation: Isolation
    ipv6: bool
    bridge: str | None
    uplink: str | None
    incarnation: int = Field(description="the revision that created it (a new one per re-create)")
    created_by: str
    created_at: datetime
    nodes: list[ClusterNetworkNodeOut] = Field(
        description="every node, and whether the network is ready there (each node's bridge "
        "is its own segment: its own DHCP and NAT, addresses per node)"
    )
    ready_nodes: int
    vms: list[str] = Field(description="cluster VMs whose spec names this network")
    revision: int
