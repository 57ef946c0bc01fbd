"""The plan: what apply would do to make the host what the manifest says. Pure.

Compares the desired :class:`Manifest` with the current :class:`HostState` and, when given,
the :class:`AppliedRecord` of the last apply (for drift). Rules:

* An object the manifest names is created, updated, or, when it exists but was created by
  hand, taken over (``adopt``): from then on apply manages it.
* A VM change that needs a restart (see :mod:`stoker.manifest.fields`) is applied in place
  when the VM is not running; on a running VM it restarts it only with ``restart``, else it
  is *pending*: the live part is applied now, the rest waits (and the plan keeps saying so).
* Only ``prune`` deletes, and only objects an apply created (``managed_by``); objects made
  by hand that the manifest does not name are never touched.
* ``running = true`` starts a VM that is pending or stopped, ``false`` stops a running one;
  unset leaves the run state to the operator and the schedules.

Steps come in a fixed order: deletes of schedules and VMs first (they free names and
memory), then networks, VMs, quotas, snapshot policies, schedules, starts, and last the
deletes of networks (once no VM uses them); within a group by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from stoker.domain.quota import Quota
from stoker.domain.spec import VMSpec
from stoker.domain.states import ACTIVE_STATES, VMState
from stoker.manifest.diff import differences
from stoker.manifest.fields import head, needs_restart
from stoker.manifest.model import DesiredSchedule, DesiredVM, Manifest, SnapshotPolicySpec
from stoker.manifest.render import render_plan
from stoker.manifest.state import (
    MANAGER,
    AppliedRecord,
    HostState,
    NetworkRecord,
    ScheduleState,
    VMRecord,
)
from stoker.manifest.steps import Change, Drift, Kind, Op, Step

EXIT_NO_CHANGES = 0
EXIT_CHANGES = 2

_STARTABLE = frozenset({VMState.PENDING, VMState.STOPPED})
_OP_ORDER = (Op.STOP, Op.DELETE, Op.CREATE, Op.REPLACE, Op.UPDATE, Op.RESTART, Op.PENDING)
_PHASE = {Kind.NETWORK: 2, Kind.VM: 3, Kind.QUOTA: 4, Kind.SNAPSHOT_POLICY: 5, Kind.SCHEDULE: 6}
_DELETE_PHASE = {Kind.SCHEDULE: 0, Kind.VM: 1, Kind.NETWORK: 8}
_START_PHASE = 7
_T = TypeVar("_T")


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]
    drift: tuple[Drift, ...]
    #: managed objects the manifest no longer has, kept because ``prune`` was not given
    kept: tuple[tuple[Kind, str], ...]
    manifest_hash: str
    current: HostState
    prune: bool = False
    restart: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.steps)

    def exit_code(self) -> int:
        """As ``terraform plan -detailed-exitcode``: 0 nothing to do, 2 something to do (a
        pending restart counts: the host does not match the file)."""
        return EXIT_CHANGES if self.steps else EXIT_NO_CHANGES

    def summary(self) -> dict[str, int]:
        counts = {str(op): 0 for op in Op}
        for step in self.steps:
            counts[str(step.op)] += 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "manifest_hash": self.manifest_hash,
            "changed": self.changed,
            "exit_code": self.exit_code(),
            "prune": self.prune,
            "restart": self.restart,
            "summary": self.summary(),
            "steps": [s.to_dict() for s in self.steps],
            "drift": [d.to_dict() for d in self.drift],
            "kept": [{"kind": str(k), "name": n} for k, n in self.kept],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def render(self, width: int = 80) -> str:
        return render_plan(self, width)

    def state_after(self) -> HostState:
        return state_after(self)

    def record(self) -> AppliedRecord:
        """What apply stores when every step succeeded, for the next plan's drift check."""
        return AppliedRecord(self.manifest_hash, state_after(self).managed_only())


def plan(
    desired: Manifest,
    current: HostState,
    *,
    last_applied: AppliedRecord | None = None,
    prune: bool = False,
    restart: bool = False,
) -> Plan:
    steps: list[Step] = []
    kept: list[tuple[Kind, str]] = []
    steps += _networks(desired, current, prune, kept)
    steps += _vms(desired, current, prune, restart, kept)
    steps += _schedules(desired, current, prune, kept)
    steps.sort(key=_order)
    drift = _drift(last_applied.state, current) if last_applied is not None else []
    return Plan(
        tuple(steps), tuple(drift), tuple(sorted(kept)), desired.hash, current, prune, restart
    )


def _order(step: Step) -> tuple[int, str, int]:
    if step.op == Op.START:
        phase = _START_PHASE
    elif step.op == Op.DELETE and step.kind in _DELETE_PHASE:
        phase = _DELETE_PHASE[step.kind]
    else:
        phase = _PHASE[step.kind]
    return phase, step.name, _OP_ORDER.index(step.op) if step.op in _OP_ORDER else 0


def _changes(old: Any, new: Any, prefix: str = "", vm: bool = False) -> tuple[Change, ...]:
    return tuple(
        Change(prefix + path, a, b, vm and needs_restart(path))
        for path, a, b in differences(old, new)
    )


# --------------------------------------------------------------------------- values compared


def vm_values(record: VMRecord) -> dict[str, Any]:
    """A VM's own settings as compared: its spec, warm start and network."""
    values = record.spec.model_dump(mode="json")
    values["warm_start"] = record.warm_start
    values["network_name"] = record.network_name
    return values


def quota_values(quota: Quota | None) -> dict[str, Any]:
    return quota.set_fields() if quota is not None else {}


def policy_values(policy: SnapshotPolicySpec | None) -> dict[str, Any]:
    if policy is None:
        return {}
    return {k: v for k, v in policy.model_dump().items() if v is not None}


def desired_record(vm: DesiredVM, state: VMState = VMState.PENDING) -> VMRecord:
    return VMRecord(
        spec=vm.spec,
        state=state,
        quota=vm.quota,
        snapshot_policy=vm.snapshot_policy,
        warm_start=vm.warm_start,
        network_name=vm.network_name,
        managed_by=MANAGER,
    )


def schedule_record(schedule: DesiredSchedule, current: HostState) -> ScheduleState:
    """The row the scheduler would store: zone and grace default as it defaults them."""
    spec = schedule.spec
    return ScheduleState(
        name=schedule.name,
        action=spec.action,
        cron=spec.cron,
        tz=spec.tz or current.schedule_tz,
        grace_s=current.schedule_grace_s if spec.grace_s is None else spec.grace_s,
        vm=spec.vm,
        selector=spec.selector,
        spread_s=spec.spread_s,
        enabled=spec.enabled,
        options=dict(spec.options),
        managed_by=MANAGER,
    )


# --------------------------------------------------------------------------- networks


def _networks(
    desired: Manifest, current: HostState, prune: bool, kept: list[tuple[Kind, str]]
) -> list[Step]:
    steps = []
    now = {n.name: n for n in current.networks}
    for spec in desired.networks:
        target = NetworkRecord(spec.name, spec.subnet, spec.isolation, MANAGER)
        existing = now.get(spec.name)
        if existing is None:
            steps.append(Step(Kind.NETWORK, Op.CREATE, spec.name, target=target))
            continue
        changes = _changes(existing.values(), target.values())
        adopt = existing.managed_by != MANAGER
        if not changes and not adopt:
            continue
        if existing.subnet != target.subnet:
            note = "a subnet cannot change in place: the network is deleted and made again"
            steps.append(Step(Kind.NETWORK, Op.REPLACE, spec.name, changes, note, adopt, target))
        else:
            steps.append(
                Step(Kind.NETWORK, Op.UPDATE, spec.name, changes, _adopt(adopt), adopt, target)
            )
    wanted = {n.name for n in desired.networks}
    for existing in current.networks:
        if existing.name not in wanted and existing.managed_by == MANAGER:
            if prune:
                steps.append(Step(Kind.NETWORK, Op.DELETE, existing.name))
            else:
                kept.append((Kind.NETWORK, existing.name))
    return steps


def _adopt(adopt: bool) -> str:
    return "created by hand: apply takes it over" if adopt else ""


# --------------------------------------------------------------------------- VMs


def _vms(
    desired: Manifest,
    current: HostState,
    prune: bool,
    restart: bool,
    kept: list[tuple[Kind, str]],
) -> list[Step]:
    steps: list[Step] = []
    now = {vm.name: vm for vm in current.vms}
    for vm in desired.vms:
        existing = now.get(vm.name)
        if existing is None:
            steps += _create_vm(vm)
        else:
            steps += _update_vm(vm, existing, restart)
    wanted = {vm.name for vm in desired.vms}
    for existing in current.vms:
        if existing.name in wanted or existing.managed_by != MANAGER:
            continue
        if not prune:
            kept.append((Kind.VM, existing.name))
            continue
        note = "running: stopped (forced) first" if existing.state in ACTIVE_STATES else ""
        steps.append(Step(Kind.VM, Op.DELETE, existing.name, note=note))
    return steps


def _create_vm(vm: DesiredVM) -> list[Step]:
    spec = vm.spec
    note = f"{spec.vcpus} vCPU, {spec.memory_mib} MiB, {spec.hypervisor}"
    steps = [Step(Kind.VM, Op.CREATE, vm.name, note=note, target=desired_record(vm))]
    steps += _quota_step(vm, None)
    steps += _policy_step(vm, None)
    if vm.running:
        steps.append(Step(Kind.VM, Op.START, vm.name, note="running = true"))
    return steps


def _update_vm(vm: DesiredVM, existing: VMRecord, restart: bool) -> list[Step]:
    steps: list[Step] = []
    active = existing.state in ACTIVE_STATES
    stopping = active and vm.running is False
    if stopping:
        steps.append(Step(Kind.VM, Op.STOP, vm.name, note="running = false"))
        active = False
    state = VMState.STOPPED if stopping else existing.state
    target = desired_record(vm, state)
    changes = _changes(vm_values(existing), vm_values(target), vm=True)
    adopt = existing.managed_by != MANAGER
    restart_fields = sorted({head(c.field) for c in changes if c.restart})
    restarts = False
    if changes or adopt:
        why = ", ".join(restart_fields)
        notes = [_adopt(adopt)] if adopt else []
        if restart_fields and active and restart:
            op, restarts = Op.RESTART, True
            target = replace(target, state=VMState.STOPPED)
            notes.append(f"restart for {why}")
        elif restart_fields and active:
            op = Op.PENDING
            target = _live_part(existing, target)
            notes.append(f"restart pending for {why}: apply --restart restarts it")
        else:
            op = Op.UPDATE
            if restart_fields:
                notes.append(f"{why}: takes effect at the next start")
        steps.append(Step(Kind.VM, op, vm.name, changes, "; ".join(notes), adopt, target))
    steps += _quota_step(vm, existing)
    steps += _policy_step(vm, existing)
    if restarts:
        steps.append(Step(Kind.VM, Op.START, vm.name, note="after the restart"))
    elif vm.running and state in _STARTABLE:
        steps.append(Step(Kind.VM, Op.START, vm.name, note="running = true"))
    return steps


def _live_part(existing: VMRecord, target: VMRecord) -> VMRecord:
    """The record a pending-restart apply writes: the current spec, network and state with
    only the fields that apply live taken from the manifest."""
    live = {f: getattr(target.spec, f) for f in VMSpec.model_fields if not needs_restart(f)}
    return replace(
        target,
        spec=existing.spec.model_copy(update=live),
        warm_start=existing.warm_start if needs_restart("warm_start") else target.warm_start,
        network_name=(
            existing.network_name if needs_restart("network_name") else target.network_name
        ),
        state=existing.state,
    )


def _quota_step(vm: DesiredVM, existing: VMRecord | None) -> list[Step]:
    old = quota_values(existing.quota if existing else None)
    new = quota_values(vm.quota)
    if old == new:
        return []
    op = Op.CREATE if not old else Op.DELETE if not new else Op.UPDATE
    note = "the agent's configured defaults apply again" if op == Op.DELETE else ""
    return [Step(Kind.QUOTA, op, vm.name, _changes(old, new), note, target=vm.quota)]


def _policy_step(vm: DesiredVM, existing: VMRecord | None) -> list[Step]:
    old = policy_values(existing.snapshot_policy if existing else None)
    new = policy_values(vm.snapshot_policy)
    if old == new:
        return []
    op = Op.CREATE if not old else Op.DELETE if not new else Op.UPDATE
    return [Step(Kind.SNAPSHOT_POLICY, op, vm.name, _changes(old, new), target=vm.snapshot_policy)]


# --------------------------------------------------------------------------- schedules


def _schedules(
    desired: Manifest, current: HostState, prune: bool, kept: list[tuple[Kind, str]]
) -> list[Step]:
    steps = []
    now = {s.name: s for s in current.schedules}
    for schedule in desired.schedules:
        target = schedule_record(schedule, current)
        existing = now.get(schedule.name)
        if existing is None:
            note = _schedule_summary(target)
            steps.append(Step(Kind.SCHEDULE, Op.CREATE, schedule.name, note=note, target=target))
            continue
        changes = _changes(existing.values(), target.values())
        adopt = existing.managed_by != MANAGER
        if changes or adopt:
            steps.append(
                Step(Kind.SCHEDULE, Op.UPDATE, schedule.name, changes, _adopt(adopt), adopt, target)
            )
    wanted = {s.name for s in desired.schedules}
    for existing in current.schedules:
        if existing.name not in wanted and existing.managed_by == MANAGER:
            if prune:
                steps.append(Step(Kind.SCHEDULE, Op.DELETE, existing.name))
            else:
                kept.append((Kind.SCHEDULE, existing.name))
    return steps


def _schedule_summary(record: ScheduleState) -> str:
    if record.vm is not None:
        target = record.vm
    elif record.selector:
        target = ",".join(f"{k}={v}" for k, v in record.selector.items())
    else:
        target = "the node"
    return f'{record.action} {target} at "{record.cron}" ({record.tz})'


# --------------------------------------------------------------------------- drift


def _drift(applied: HostState, current: HostState) -> list[Drift]:
    """Differences between what the last apply set and the host now, on managed objects
    (a VM's run state is not drift: schedules and operators start and stop VMs)."""
    out: list[Drift] = []
    vms = {vm.name: vm for vm in current.vms if vm.managed_by == MANAGER}
    for was in applied.vms:
        now = vms.get(was.name)
        if now is None:
            out.append(Drift(Kind.VM, was.name, None, None, None))
            continue
        pairs = (
            ("", vm_values(was), vm_values(now)),
            ("quota.", quota_values(was.quota), quota_values(now.quota)),
            (
                "snapshot_policy.",
                policy_values(was.snapshot_policy),
                policy_values(now.snapshot_policy),
            ),
        )
        for prefix, old, new in pairs:
            out += [
                Drift(Kind.VM, was.name, c.field, c.old, c.new) for c in _changes(old, new, prefix)
            ]
    for kind, was_list, now_list in (
        (Kind.SCHEDULE, applied.schedules, current.schedules),
        (Kind.NETWORK, applied.networks, current.networks),
    ):
        managed = {o.name: o for o in now_list if o.managed_by == MANAGER}
        for was_obj in was_list:
            now_obj = managed.get(was_obj.name)
            if now_obj is None:
                out.append(Drift(kind, was_obj.name, None, None, None))
                continue
            out += [
                Drift(kind, was_obj.name, c.field, c.old, c.new)
                for c in _changes(was_obj.values(), now_obj.values())
            ]
    return out


# --------------------------------------------------------------------------- the host after


def state_after(p: Plan) -> HostState:
    """The host as it will be once apply carried out every step of ``p``: what apply records
    for drift, and what a second plan must find nothing to do about."""
    objects = HostObjects.of(p.current)
    for step in p.steps:
        objects.advance(step)
    return objects.state(p.current)


@dataclass
class HostObjects:
    """The host's objects by name, moved forward one step at a time: :func:`state_after`
    for a whole plan, and apply after each step it carried out (to record that object)."""

    vms: dict[str, VMRecord]
    schedules: dict[str, ScheduleState]
    networks: dict[str, NetworkRecord]

    @classmethod
    def of(cls, host: HostState) -> HostObjects:
        return cls(
            {vm.name: vm for vm in host.vms},
            {s.name: s for s in host.schedules},
            {n.name: n for n in host.networks},
        )

    def advance(self, step: Step) -> None:
        """What ``step`` leaves behind once carried out."""
        target = step.target
        vms = self.vms
        if step.op == Op.DELETE and step.kind == Kind.VM:
            vms.pop(step.name, None)
        elif step.op == Op.DELETE and step.kind == Kind.SCHEDULE:
            self.schedules.pop(step.name, None)
        elif step.op == Op.DELETE and step.kind == Kind.NETWORK:
            self.networks.pop(step.name, None)
        elif step.kind == Kind.VM and step.op in (Op.START, Op.STOP):
            running = VMState.RUNNING if step.op == Op.START else VMState.STOPPED
            vms[step.name] = replace(vms[step.name], state=running)
        elif step.kind == Kind.VM and isinstance(target, VMRecord):
            before = vms.get(step.name)
            vms[step.name] = (
                replace(target, quota=None, snapshot_policy=None)
                if before is None
                else replace(target, quota=before.quota, snapshot_policy=before.snapshot_policy)
            )
        elif step.kind == Kind.QUOTA:
            vms[step.name] = replace(vms[step.name], quota=_as(target, Quota))
        elif step.kind == Kind.SNAPSHOT_POLICY:
            policy = _as(target, SnapshotPolicySpec)
            vms[step.name] = replace(vms[step.name], snapshot_policy=policy)
        elif isinstance(target, ScheduleState):
            self.schedules[step.name] = target
        elif isinstance(target, NetworkRecord):
            self.networks[step.name] = target

    def state(self, base: HostState) -> HostState:
        return replace(
            base,
            vms=tuple(self.vms[k] for k in sorted(self.vms)),
            schedules=tuple(self.schedules[k] for k in sorted(self.schedules)),
            networks=tuple(self.networks[k] for k in sorted(self.networks)),
        )


def _as(value: object, kind: type[_T]) -> _T | None:
    return value if isinstance(value, kind) else None
