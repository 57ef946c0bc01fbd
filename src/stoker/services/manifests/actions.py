"""Each kind of plan step carried out through the same service call the API makes for it."""

from __future__ import annotations

from typing import TypeVar

from stoker.domain.networks import Isolation, NetworkSpec
from stoker.domain.quota import Quota
from stoker.domain.states import ACTIVE_STATES
from stoker.manifest import (
    MANAGER,
    Kind,
    NetworkRecord,
    Op,
    ScheduleState,
    SnapshotPolicySpec,
    Step,
    VMRecord,
)
from stoker.services.manifests.host import HostServices
from stoker.services.scheduler import ScheduleSpec, ScheduleUpdate

REASON = "manifest apply"
_T = TypeVar("_T")


class StepRunner(HostServices):
    async def run(self, step: Step) -> str | None:
        """Carry out ``step``; the id of the object it made or changed (None for a delete)."""
        if step.kind == Kind.VM:
            return await self._vm(step)
        if step.kind == Kind.QUOTA:
            return await self._quota(step)
        if step.kind == Kind.SNAPSHOT_POLICY:
            return self._policy(step)
        if step.kind == Kind.SCHEDULE:
            return self._schedule(step)
        return await self._network(step)

    async def _vm(self, step: Step) -> str | None:
        lifecycle, name = self.lifecycle, step.name
        if step.op == Op.DELETE:
            # snapshots are backups: a pruned VM's are kept (restorable into a new VM)
            await lifecycle.delete(name, force=True, snapshots="keep")
            return None
        if step.op == Op.START:
            return (await lifecycle.start(name, reason=f"{REASON}: running")).id
        if step.op == Op.STOP:
            return (await lifecycle.stop(name, reason=f"{REASON}: running = false")).id
        target = _target(step, VMRecord)
        if step.op == Op.CREATE:
            return (await lifecycle.create(target.spec)).id
        if step.op == Op.RESTART and lifecycle.get(name, 0).state in ACTIVE_STATES:
            # the start comes as its own step, after quotas and policies are in place
            await lifecycle.stop(name, reason=f"{REASON}: restart for a new spec")
        return (await lifecycle.update_spec(name, target.spec, reason=REASON)).id

    async def _quota(self, step: Step) -> str:
        if step.op == Op.DELETE:
            return (await self.quotas.remove(step.name)).vm.id
        return (await self.quotas.set(step.name, _target(step, Quota))).vm.id

    def _policy(self, step: Step) -> str:
        if step.op == Op.DELETE:
            return self.snapshots.set_policy(step.name, None, None).vm_id
        policy = _target(step, SnapshotPolicySpec)
        return self.snapshots.set_policy(step.name, policy.retention, policy.interval).vm_id

    def _schedule(self, step: Step) -> str | None:
        if step.op == Op.DELETE:
            self.scheduler.delete(step.name)
            return None
        values = _target(step, ScheduleState).values()
        if step.op == Op.CREATE:
            return self.scheduler.create(ScheduleSpec(name=step.name, **values)).id
        return self.scheduler.update(step.name, ScheduleUpdate(**values)).id

    async def _network(self, step: Step) -> str | None:
        if step.op == Op.UPDATE and not step.changes:  # taken over as it is
            return self.networks.get_record(step.name).id
        if step.op in (Op.DELETE, Op.REPLACE, Op.UPDATE):
            # the network service changes nothing in place: isolation and subnet both make
            # a new bridge; it refuses (naming the VMs) while VMs are on the network
            await self.networks.delete(step.name)
        if step.op == Op.DELETE:
            return None
        net = _target(step, NetworkRecord)
        spec = NetworkSpec(name=net.name, subnet=net.subnet, isolation=Isolation(net.isolation))
        return (await self.networks.create(spec, managed_by=MANAGER)).record.id


def _target(step: Step, kind: type[_T]) -> _T:
    target = step.target
    if not isinstance(target, kind):  # a plan always gives its steps their target
        raise TypeError(f"{step.kind} {step.op} {step.name}: no {kind.__name__} to write")
    return target
