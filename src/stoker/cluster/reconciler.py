"""The node side: make this node's local VMs match what the cluster placed on it, and report.

A pass looks at every cluster VM that concerns this node (placed here, owned here, or with a
local copy here), asks ``decide`` what to do next, and runs the steps in a task per VM (one at
a time per VM, so a slow graceful stop never holds up the others). Passes run when the
cluster view changes, when a local cluster VM changes state, and every
``reconcile_interval_s``. Local copies are ordinary local VMs (the lifecycle, health,
recovery, quotas all apply) carrying the ``stoker.cluster/incarnation`` label.

Every write is a transaction conditioned on what the decision was made on: the owner record
is created only if absent, only while this node's ``alive`` key holds its current lease and
the placement is still the one read; the status only while the placement is unchanged; the
owner released only if it is still this lease's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from stoker.cluster import keys
from stoker.cluster.decide import Do, Facts, Local, Step, decide, needs_report
from stoker.cluster.etcd import Condition, Delete, Etcd, EtcdError, Put, absent, unchanged
from stoker.cluster.fencer import Fencer, cluster_copies
from stoker.cluster.ownership import Ownership, incarnation_of
from stoker.cluster.records import (
    CLUSTER_LABEL,
    OwnerRecord,
    PlacementRecord,
    StatusRecord,
    VMRecord,
    now_utc,
)
from stoker.cluster.session import NodeSession
from stoker.cluster.view import ClusterView
from stoker.domain.events import Event, EventType
from stoker.domain.spec import VMSpec
from stoker.domain.spec_changes import changed_fields
from stoker.domain.states import IllegalAction, VMState
from stoker.domain.vm import VM
from stoker.services.errors import ServiceError
from stoker.services.lifecycle import Lifecycle
from stoker.services.loops import cancel

log = logging.getLogger("stoker.cluster")

S = VMState
_DEBOUNCE_S = 0.01
_FIRST_BACKOFF_S = 1.0
#: steps that only ever stop or let go: never held back by a backoff
SAFE_STEPS = frozenset({Do.STOP, Do.FORCE_STOP, Do.RELEASE_OWNER})


def local_spec(record: VMRecord, incarnation: int) -> VMSpec:
    """The spec of this node's copy: the cluster's, plus the incarnation label."""
    labels = {**record.spec.labels, CLUSTER_LABEL: str(incarnation)}
    return record.spec.model_copy(update={"labels": labels})


class Reconciler:
    def __init__(
        self,
        etcd: Etcd,
        view: ClusterView,
        session: NodeSession,
        ownership: Ownership,
        lifecycle: Lifecycle,
        fencer: Fencer,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.etcd = etcd
        self.view = view
        self.session = session
        self.ownership = ownership
        self.lifecycle = lifecycle
        self.fencer = fencer
        self.cfg = session.cfg
        self.me = session.cfg.node_name
        self.clock = clock
        self._kick = asyncio.Event()
        self._busy: dict[str, asyncio.Task[Any]] = {}
        #: name -> (next restart allowed at, current delay): the node's own backoff for VMs
        #: it restarts after an error because their desired state is running
        self._backoff: dict[str, tuple[float, float]] = {}
        #: name -> (incarnation, why) when this node could not create its local copy
        self._refused: dict[str, tuple[int, str, float]] = {}
        self._completed: dict[tuple[str, int, int], VMSpec] = {}
        #: name -> (incarnation, the record's ``restarts`` its copy has satisfied)
        self._restarts: dict[str, tuple[int, int]] = {}
        self._task: asyncio.Task[None] | None = None

    # -- running -------------------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cluster reconciler")

    async def stop(self) -> None:
        await cancel(self._task)
        self._task = None
        for task in list(self._busy.values()):
            task.cancel()
        await asyncio.gather(*self._busy.values(), return_exceptions=True)

    def on_event(self, event: Event) -> None:
        """A local VM changed: look again (cheap; passes are debounced)."""
        if event.type in (EventType.VM_STATE, EventType.VM_DELETED, EventType.VM_CREATED):
            self._kick.set()

    async def _run(self) -> None:
        await self.view.synced.wait()
        version = -1
        while True:
            try:
                self.pass_once()
                self.fencer.refresh_guard()
            except Exception:
                log.exception("cluster reconcile pass failed")
            waiter = asyncio.create_task(
                self.view.wait_changed(version, self.cfg.reconcile_interval_s)
            )
            kicked = asyncio.create_task(self._kick.wait())
            await asyncio.wait({waiter, kicked}, return_when=asyncio.FIRST_COMPLETED)
            for task in (waiter, kicked):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
            version = self.view.version
            self._kick.clear()
            await asyncio.sleep(_DEBOUNCE_S)

    # -- one pass ------------------------------------------------------------------------------

    def concerned(self, copies: dict[str, VM]) -> set[str]:
        names = {name for name, vm in copies.items() if incarnation_of(vm) is not None}
        for name, (_, placed) in self.view.records(keys.PLACEMENTS, PlacementRecord).items():
            if placed.node == self.me:
                names.add(name)
        for name, (_, owner) in self.view.records(keys.OWNERS, OwnerRecord).items():
            if owner.node == self.me:
                names.add(name)
        return names

    def pass_once(self) -> None:
        copies = {vm.name: vm for vm in self.lifecycle.directory.all()}
        now = self.clock()
        for name in sorted(self.concerned(copies)):
            if name in self._busy:
                continue
            copy = copies.get(name)
            backoff = self._backoff.get(name)
            if backoff and copy is not None and copy.state == S.RUNNING and now > backoff[0] + 60:
                del self._backoff[name]  # it has run for a minute: a fresh start next time
            facts = self.facts(name, copy)
            verdict = decide(facts)
            steps = verdict.steps
            if self._backoff.get(name, (0.0, 0.0))[0] > now:
                # after a failure, only what makes things safer runs before the backoff ends
                steps = tuple(s for s in steps if s.do in SAFE_STEPS)
            report = verdict.report if self._placed_here(facts) else None
            refused = self._refused.get(name)
            if report and refused and refused[0] == facts.incarnation and facts.local is None:
                report = (S.ERROR, refused[1])
            if report is not None and not needs_report(facts, *report):
                report = None
            if not steps and report is None:
                continue
            task = asyncio.create_task(self._act(name, facts, steps, report))
            self._busy[name] = task
            task.add_done_callback(functools.partial(self._done, name))

    def _done(self, name: str, _task: asyncio.Task[Any]) -> None:
        self._busy.pop(name, None)
        self._kick.set()

    def _placed_here(self, f: Facts) -> bool:
        p = f.placement
        return p is not None and p.node == self.me and p.incarnation == f.incarnation

    def facts(self, name: str, copy: VM | None) -> Facts:
        vm_kv = self.view.get(keys.vm(name))
        record = self.view.record(keys.vm(name), VMRecord)
        incarnation = vm_kv.create_revision if vm_kv is not None and record else None
        local = None
        if copy is not None:
            copy_incarnation = incarnation_of(copy)
            differs = False
            if record is not None and vm_kv is not None and copy_incarnation == incarnation:
                differs = self._differs(copy, record, vm_kv.create_revision, vm_kv.mod_revision)
            local = Local(
                state=copy.state,
                reason=copy.state_reason,
                incarnation=copy_incarnation,
                spec_differs=differs,
                retry_pending=copy.next_retry_at is not None,
            )
        status = self.view.record(keys.status(name), StatusRecord)
        return Facts(
            me=self.me,
            lease=self.session.lease_id,
            may_run=self.session.may_run(),
            incarnation=incarnation,
            record=record,
            placement=self.view.record(keys.placement(name), PlacementRecord),
            owner=self.view.record(keys.owner(name), OwnerRecord),
            status=status,
            local=local,
            restarts_done=self._restarts_done(name, incarnation, record, status),
        )

    def _restarts_done(
        self,
        name: str,
        incarnation: int | None,
        record: VMRecord | None,
        status: StatusRecord | None,
    ) -> int | None:
        """What this node's copy has satisfied of the record's restart requests: what it did
        since the agent started, else what it last reported (so a request made while the
        agent was down is still done), else all of them (a copy new here has nothing to
        restart for)."""
        if record is None or incarnation is None:
            return None
        known = self._restarts.get(name)
        if known is not None and known[0] == incarnation:
            return known[1]
        if status is not None and status.node == self.me and status.incarnation == incarnation:
            done = status.restarts or 0
        else:
            done = record.restarts or 0
        self._restarts[name] = (incarnation, done)
        return done

    def _satisfied(self, name: str, f: Facts) -> None:
        """A (re)start of the copy satisfies every restart request made so far."""
        if f.record is not None and f.incarnation is not None:
            self._restarts[name] = (f.incarnation, f.record.restarts or 0)

    def _differs(self, copy: VM, record: VMRecord, incarnation: int, revision: int) -> bool:
        key = (copy.name, incarnation, revision)
        wanted = self._completed.get(key)
        if wanted is None:
            try:
                wanted = self.lifecycle.complete_spec(local_spec(record, incarnation))
            except ServiceError:
                return False
            self._completed = {k: v for k, v in self._completed.items() if k[0] != copy.name}
            self._completed[key] = wanted
        return bool(changed_fields(copy.spec, wanted))

    # -- doing ---------------------------------------------------------------------------------

    async def _act(
        self, name: str, f: Facts, steps: tuple[Step, ...], report: tuple[VMState, str] | None
    ) -> None:
        """Run the steps in order, stopping at the first that fails or whose condition no
        longer holds; then (when nothing ran) report. After steps the next pass reports the
        state they led to."""
        for step in steps:
            try:
                if not await self._do(name, f, step):
                    self._backoff_more(name)  # a condition did not hold: look again later
                    return
            except (ServiceError, IllegalAction) as exc:
                log.warning("cluster: %s %s: %s", step.do.value, name, exc)
                self._failed(name, f, step, str(exc))
                return
            except EtcdError as exc:
                log.info("cluster: %s %s: %s", step.do.value, name, exc)
                self._failed(name, f, step, str(exc))
                return
            except Exception as exc:
                log.exception("cluster: %s %s failed", step.do.value, name)
                self._failed(name, f, step, repr(exc))
                return
        if not steps and report is not None:
            await self._report(name, f, report)

    def _failed(self, name: str, f: Facts, step: Step, why: str) -> None:
        self._backoff_more(name)
        if step.do == Do.CREATE_LOCAL and f.incarnation is not None:
            self._refused[name] = (f.incarnation, f"node {self.me} cannot run it: {why}", 0.0)

    def _backoff_more(self, name: str) -> None:
        _, delay = self._backoff.get(name, (0.0, _FIRST_BACKOFF_S / 2))
        delay = min(delay * 2, self.cfg.restart_backoff_max_s)
        self._backoff[name] = (self.clock() + delay, delay)

    async def _do(self, name: str, f: Facts, step: Step) -> bool:
        """Run one step; False stops the steps after it (a condition did not hold)."""
        do, why = step.do, f"cluster: {step.why}"
        if do == Do.CREATE_LOCAL:
            assert f.record is not None and f.incarnation is not None
            await self.lifecycle.create(local_spec(f.record, f.incarnation))
            self._refused.pop(name, None)
        elif do == Do.UPDATE_SPEC:
            assert f.record is not None and f.incarnation is not None
            await self.lifecycle.update_spec(name, local_spec(f.record, f.incarnation), why)
        elif do == Do.TAKE_OWNER:
            return await self._take(name, f)
        elif do == Do.START:
            self._satisfied(name, f)
            await self.lifecycle.start(name, reason=why)
        elif do == Do.RESTART:
            self._backoff_more(name)
            self._satisfied(name, f)
            await self.lifecycle.restart(name, graceful=False, reason=why)
        elif do == Do.RESTART_REQUESTED:
            self._satisfied(name, f)  # once: a failed restart is the restart policy's now
            await self.lifecycle.restart(name, graceful=True, reason=why)
        elif do == Do.STOP:
            await self.lifecycle.stop(name, graceful=True, reason=why)
        elif do == Do.FORCE_STOP:
            vm = self.lifecycle.get(name, 0)
            if vm.state == S.RESTARTING:
                await self.lifecycle.abort(name, why)
            else:
                await self.lifecycle.stop(name, graceful=False, timeout_s=0, reason=why)
        elif do == Do.RELEASE_OWNER:
            return await self._release(name)
        elif do == Do.DELETE_LOCAL:
            await self.lifecycle.delete(name, force=True, snapshots="keep")
            self._backoff.pop(name, None)
            self._refused.pop(name, None)
            self._restarts.pop(name, None)
        return True

    async def _take(self, name: str, f: Facts) -> bool:
        lease = self.session.lease_id
        placement_kv = self.view.get(keys.placement(name))
        if lease is None or placement_kv is None or f.incarnation is None:
            return False
        owner = OwnerRecord(node=self.me, lease=lease, incarnation=f.incarnation, since=now_utc())
        result = await self.etcd.txn(
            [
                absent(keys.owner(name)),
                unchanged(keys.placement(name), placement_kv.mod_revision),
                Condition(keys.alive(self.me), "lease", "==", lease),
            ],
            [Put(keys.owner(name), owner.dump(), lease)],
            timeout=self.cfg.etcd_timeout_s,
        )
        if result.succeeded:
            self.ownership.took(name, lease, f.incarnation)
            log.info("cluster: %s is ours (lease %x)", name, lease)
        return result.succeeded

    async def _release(self, name: str) -> bool:
        lease = self.session.lease_id
        if lease is None:
            return False
        await self.etcd.txn(
            [Condition(keys.owner(name), "lease", "==", lease)],
            [Delete(keys.owner(name))],
            timeout=self.cfg.etcd_timeout_s,
        )
        self.ownership.released(name)
        return True

    async def _report(self, name: str, f: Facts, report: tuple[VMState, str]) -> None:
        """Write what this node sees, while the placement is the one decided on."""
        placement_kv = self.view.get(keys.placement(name))
        if placement_kv is None or f.incarnation is None:
            return
        state, reason = report
        copy = self.lifecycle.directory.find(name)
        since = copy.state_since if copy is not None and copy.state == state else now_utc()
        status = StatusRecord(
            node=self.me,
            incarnation=f.incarnation,
            state=state,
            reason=reason[:2000],
            since=since,
            reported_at=now_utc(),
            restarts=f.restarts_done or None,
        )
        with contextlib.suppress(EtcdError):
            await self.etcd.txn(
                [unchanged(keys.placement(name), placement_kv.mod_revision)],
                [Put(keys.status(name), status.dump())],
                timeout=self.cfg.etcd_timeout_s,
            )

    # -- for the API ---------------------------------------------------------------------------

    def local_copies(self) -> list[VM]:
        return cluster_copies(self.lifecycle)
