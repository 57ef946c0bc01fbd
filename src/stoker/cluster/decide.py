"""What a node does next about one cluster VM (pure: the reconciler gathers the facts, this
says what to do, the reconciler does it and asks again).

The rules that make "never on two nodes" hold on this side:

- a VM is started only when its placement names this node, its owner record is this node's
  under its current lease, and the fence says the node may run VMs;
- a local copy that runs while the owner record names anyone else is stopped at once, forced;
- ownership is released only after the local copy stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from stoker.cluster.records import OwnerRecord, PlacementRecord, StatusRecord, VMRecord
from stoker.domain.states import VMState

S = VMState
ACTIVE = frozenset({S.STARTING, S.RUNNING, S.RESTARTING, S.STOPPING})


class Do(StrEnum):
    CREATE_LOCAL = "create-local"
    UPDATE_SPEC = "update-spec"
    TAKE_OWNER = "take-owner"
    START = "start"
    RESTART = "restart"
    #: a restart request in the VM record (a cluster schedule): restart the running copy once
    RESTART_REQUESTED = "restart-requested"
    STOP = "stop"
    FORCE_STOP = "force-stop"
    RELEASE_OWNER = "release-owner"
    DELETE_LOCAL = "delete-local"
    REPORT = "report"


@dataclass(frozen=True)
class Local:
    """This node's copy of the VM, as its lifecycle has it."""

    state: VMState
    reason: str
    #: the cluster incarnation its label carries; None: a local VM the cluster does not manage
    incarnation: int | None
    #: its stored spec differs from the cluster's (after this node's defaults)
    spec_differs: bool = False
    #: the local restart policy has a restart scheduled
    retry_pending: bool = False


@dataclass(frozen=True)
class Facts:
    me: str
    #: this node's current lease (None: not registered)
    lease: int | None
    may_run: bool
    incarnation: int | None
    record: VMRecord | None
    placement: PlacementRecord | None
    owner: OwnerRecord | None
    status: StatusRecord | None
    local: Local | None
    #: the record's ``restarts`` this node's copy has satisfied (None: nothing to compare)
    restarts_done: int | None = None


@dataclass(frozen=True)
class Step:
    do: Do
    why: str


@dataclass(frozen=True)
class Verdict:
    steps: tuple[Step, ...]
    #: the state and reason to report (when this node reports), else None
    report: tuple[VMState, str] | None = None


def _mine(f: Facts) -> bool:
    return f.owner is not None and f.owner.node == f.me and f.owner.lease == f.lease


def decide(f: Facts) -> Verdict:
    local = f.local
    if local is not None and local.incarnation is None:
        # a VM of this node's own with the cluster VM's name: never touched
        if _placed_here(f):
            why = f"a local VM named {f.record.spec.name if f.record else '?'} that the "
            why += "cluster does not manage exists on this node; rename or delete it"
            return Verdict((), (S.ERROR, why))
        return Verdict(())
    if (
        f.record is None
        or f.incarnation is None
        or (local is not None and local.incarnation != f.incarnation)
    ):
        return _gone(f, "deleted from the cluster" if f.record is None else "re-created")
    if not _placed_here(f):
        return _elsewhere(f)
    return _placed(f)


def _placed_here(f: Facts) -> bool:
    p = f.placement
    return p is not None and p.incarnation == f.incarnation and p.node == f.me


def _gone(f: Facts, why: str) -> Verdict:
    """The VM (this incarnation of it) no longer exists: stop, release, delete the copy."""
    local = f.local
    if local is not None and local.state in ACTIVE:
        return Verdict((Step(Do.FORCE_STOP, why),))
    steps = []
    if _mine(f):
        steps.append(Step(Do.RELEASE_OWNER, why))
    if local is not None:
        steps.append(Step(Do.DELETE_LOCAL, why))
    return Verdict(tuple(steps))


def _elsewhere(f: Facts) -> Verdict:
    p = f.placement
    where = f"moved to {p.node}" if p is not None and p.node else "no longer placed here"
    local = f.local
    if local is not None and local.state in ACTIVE:
        if local.state == S.STOPPING:
            return Verdict(())
        return Verdict((Step(Do.STOP, where),))
    steps = []
    if _mine(f):
        steps.append(Step(Do.RELEASE_OWNER, where))
    if local is not None:
        steps.append(Step(Do.DELETE_LOCAL, where))
    return Verdict(tuple(steps))


def _placed(f: Facts) -> Verdict:
    assert f.record is not None
    local = f.local
    if local is None:
        return Verdict((Step(Do.CREATE_LOCAL, "placed on this node"),), (S.PENDING, "placed"))
    steps: list[Step] = []
    owner = f.owner
    if owner is not None and not _mine(f) and local.state in ACTIVE:
        # someone else holds it: this copy must not run, whatever else is true
        holder = f"owned by {owner.node} under lease {owner.lease:x}"
        return Verdict((Step(Do.FORCE_STOP, holder),), (local.state, local.reason))
    active = local.state in ACTIVE
    if local.spec_differs and not active:
        steps.append(Step(Do.UPDATE_SPEC, "spec changed"))
    if f.record.desired == "stopped":
        if active and local.state != S.STOPPING:
            steps.append(Step(Do.STOP, "desired state is stopped"))
        elif not active and _mine(f):
            steps.append(Step(Do.RELEASE_OWNER, "stopped"))
        return Verdict(tuple(steps), (local.state, local.reason))
    report = (local.state, local.reason)
    if owner is not None and not _mine(f):
        return Verdict(
            tuple(steps), (local.state, f"waiting for {owner.node} to stop it and let go")
        )
    if not f.may_run:
        if active and owner is None:
            return Verdict(
                (Step(Do.FORCE_STOP, "running without an owner record while fenced"),), report
            )
        if not active:
            report = (local.state, "not starting: this node's lease is not in good standing")
        return Verdict(tuple(steps), report)
    if owner is None:
        steps.append(Step(Do.TAKE_OWNER, "placed here, nobody owns it"))
    if local.state in (S.PENDING, S.STOPPED):
        steps.append(Step(Do.START, "desired state is running"))
    elif local.state == S.ERROR and not local.retry_pending:
        steps.append(Step(Do.RESTART, "desired state is running; it is in error"))
    elif local.state == S.RUNNING and restart_pending(f):
        steps.append(Step(Do.RESTART_REQUESTED, "a restart was requested (cluster schedule)"))
    return Verdict(tuple(steps), report)


def restart_pending(f: Facts) -> bool:
    """The record asks for more restarts than this node's copy has satisfied."""
    if f.record is None or f.record.restarts is None or f.restarts_done is None:
        return False
    return f.record.restarts > f.restarts_done


def needs_report(f: Facts, state: VMState, reason: str) -> bool:
    """Is the status record out of date with what this node would report?"""
    s = f.status
    return (
        s is None
        or s.node != f.me
        or s.incarnation != f.incarnation
        or s.state != state
        or s.reason != reason
        or (s.restarts or 0) != (f.restarts_done or 0)
    )
