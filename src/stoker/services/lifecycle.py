"""The lifecycle service: the single path for every VM state change.

Operators' requests and the agent's own loops (health, recovery, schedules) all come here.
Each VMM gets one supervisor task that owns it from spawn to exit; an operation that ends a
VMM on purpose (stop, restart, delete) first takes the handle away from its supervisor, so an
exit is handled exactly once, by whoever owns the VMM at that moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from stoker.domain.events import Event, EventType
from stoker.domain.snapshots import SnapshotsOnDelete
from stoker.domain.spec import VMSpec
from stoker.domain.spec_changes import changed_fields, restart_fields
from stoker.domain.states import (
    ACTIVE_STATES,
    Action,
    IllegalAction,
    VMState,
    check_action,
    check_transition,
)
from stoker.domain.vm import VM
from stoker.drivers.base import (
    VMM,
    BootOptions,
    Capabilities,
    Driver,
    DriverError,
    DriverUnavailable,
    ExitSignal,
    IOLimits,
    NetAttachment,
    ProcessRecord,
    Unsupported,
    VMIdentity,
    VMPaths,
)
from stoker.host.images import ImageRejected
from stoker.host.proc import (
    ExitStatus,
    is_same_live_process,
    kill,
)
from stoker.services.directory import OwnedVMM, VMDirectory
from stoker.services.errors import Conflict, InvalidSpec, NetworkError, StartVeto
from stoker.services.events import EventBus
from stoker.store.vms import NameTaken

log = logging.getLogger("stoker.lifecycle")

S = VMState
KILL_WAIT_S = 10.0


class ResourceGate(Protocol):
    """Capacity accounting: reserve before a VMM starts, release once it is gone."""

    def reserve(self, vm: VM) -> None:
        """Raise Conflict naming the resource when ``vm`` does not fit."""

    def release(self, vm_id: str) -> None: ...


class NoGate:
    def reserve(self, vm: VM) -> None:
        return None

    def release(self, vm_id: str) -> None:
        return None


class CreateCheck(Protocol):
    def check_create(self, spec: VMSpec) -> None:
        """Raise InvalidSpec to refuse a new VM's spec (quotas: it must fit the defaults)."""


class StartGuard(Protocol):
    async def before_start(self, vm: VM) -> None:
        """Raise StartVeto to refuse a start; runs before capacity is reserved."""


class SpawnObserver(Protocol):
    async def vmm_spawned(self, vm: VM, pid: int) -> None:
        """A VMM process exists (cgroup placement must happen before the guest touches RAM);
        failures here are the observer's to report, they never stop the start."""


class VMMObserver(Protocol):
    async def vmm_up(self, vm: VM, vmm: VMM) -> None:
        """A VMM runs its guest: after a start, a restart, a restore or a re-adoption."""


class BootLimits(Protocol):
    def boot_limits(self, vm: VM, capabilities: Capabilities) -> IOLimits | None:
        """Limits a VMM can only take in its boot configuration (Firecracker's)."""


class IdentityProvider(Protocol):
    def identity(self, vm: VM) -> VMIdentity:
        """The uid and gid the VM's VMM runs as (confinement); raises Conflict when none is
        left."""


class SavedBoot(Protocol):
    @property
    def state(self) -> Path:
        """What the hypervisor restores from."""


class WarmStarter(Protocol):
    @property
    def restore_timeout_s(self) -> float:
        """A resume not running by then is given up: the start boots cold."""

    async def warm_state(self, vm: VM) -> SavedBoot | None:
        """A boot snapshot a start should resume instead of booting (its key matches)."""

    async def verify(self, vm: VM, snapshot: Any) -> bool:
        """Its checksum matches (read while the hypervisor loads it)."""

    def failed(self, vm: VM, why: str) -> None:
        """Resuming that state did not work: the start boots cold."""


class ReadyObserver(Protocol):
    async def guest_ready(self, vm: VM, vmm: VMM, restored: bool) -> None:
        """The guest became ready after a spawn (never after a re-adoption): booted cold,
        or resumed from saved state (``restored``)."""


class SpecDefaults(Protocol):
    def complete(self, spec: VMSpec) -> VMSpec:
        """Fill in what the request left out (``spec.model_fields_set`` says what it gave):
        the network, above all, is the host's default network when the request names none."""


class VMSnapshots(Protocol):
    """A VM's snapshots as its deletion sees them (the snapshot housekeeping)."""

    def vm_lock(self, vm_id: str) -> asyncio.Lock:
        """Held while a snapshot of the VM is taken, restored or removed; taken before the
        lifecycle's own lock, never after it."""

    def check_delete(self, vm: VM, mode: SnapshotsOnDelete | None) -> None:
        """Raise Conflict when the deletion would lose snapshots nobody decided about, or
        remove protected ones."""

    async def on_delete(self, vm: VM, mode: SnapshotsOnDelete | None) -> None:
        """Keep or remove the VM's snapshots; its VMM is gone, its directory goes next."""


class NetworkAttacher(Protocol):
    async def attach(self, vm: VM) -> NetAttachment | None:
        """Make the VM's NIC ready on its managed network (TAP on the bridge, address, DHCP
        lease, forwards) before its VMM starts; None when it has no managed network.
        Idempotent: a restart attaches again. Raises NetworkError naming what failed."""


class Lifecycle:
    """Every collaborator arrives through the constructor: the capabilities that take part in
    a VM's life (quotas, health, hooks, resources, snapshots) as narrow protocols, in the
    order they are called."""

    def __init__(
        self,
        directory: VMDirectory,
        events: EventBus,
        drivers: Mapping[str, Driver],
        *,
        gate: ResourceGate | None = None,
        create_checks: Sequence[CreateCheck] = (),
        start_guards: Sequence[StartGuard] = (),
        spawn_observers: Sequence[SpawnObserver] = (),
        vmm_observers: Sequence[VMMObserver] = (),
        boot_limits: BootLimits | None = None,
        spec_defaults: Sequence[SpecDefaults] = (),
        network: NetworkAttacher | None = None,
        identities: IdentityProvider | None = None,
        vm_snapshots: VMSnapshots | None = None,
        warm: WarmStarter | None = None,
        ready_observers: Sequence[ReadyObserver] = (),
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.directory = directory
        self.vms = directory.store
        self.events = events
        self.drivers = dict(drivers)
        self.gate: ResourceGate = gate or NoGate()
        self.create_checks = tuple(create_checks)
        self.start_guards = tuple(start_guards)
        self.spawn_observers = tuple(spawn_observers)
        self.vmm_observers = tuple(vmm_observers)
        self.boot_limits = boot_limits
        self.spec_defaults = tuple(spec_defaults)
        self.network = network
        self.identities = identities
        self.vm_snapshots = vm_snapshots
        self.warm = warm
        self.ready_observers = tuple(ready_observers)
        self.clock = clock or (lambda: datetime.now(UTC))
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._changed = asyncio.Condition()

    # ----------------------------------------------------------------- the one path for state

    async def set_state(
        self,
        vm_id: str,
        to: VMState,
        reason: str,
        along: Sequence[Callable[[], object]] = (),
        durable: bool = True,
    ) -> VM:
        """Check the transition table, persist with reason and UTC time, publish an event.

        The state, its event and ``along`` (writes that belong to the same change: the VMM's
        record cleared, its reservation released) commit in one transaction: one fsync on
        the hot paths (a forced stop, a death), and never one without the others.
        """
        event = self._record_state(vm_id, to, reason, along, durable)
        await self._publish(event)
        return self._get(vm_id)

    def _record_state(
        self,
        vm_id: str,
        to: VMState,
        reason: str,
        along: Sequence[Callable[[], object]] = (),
        durable: bool = True,
    ) -> Event:
        """The write half of :meth:`set_state`: committed, not yet told to anyone."""
        vm = self._get(vm_id)
        if not (vm.state == to == S.ERROR):  # error -> error only restates why (give-up)
            check_transition(vm.state, to)
        at = self.clock()
        with self.vms.db.write(durable):
            for write in along:
                write()
            if not self.vms.compare_and_set_state(vm_id, vm.state, to, reason, at):
                raise Conflict(
                    f"{vm.name} changed state while {to.value} was being recorded; retry"
                )
            return self.events.record(
                EventType.VM_STATE,
                f"{vm.name}: {vm.state.value} -> {to.value}: {reason}",
                vm_id,
                name=vm.name,
                from_state=vm.state.value,
                to_state=to.value,
                reason=reason,
            )

    async def _publish(self, event: Event) -> None:
        """Hand a committed state change to the listeners and wake whoever waits on one."""
        self.events.deliver(event)
        async with self._changed:
            self._changed.notify_all()

    # ------------------------------------------------------------------------------ queries

    def get(self, ref: str, transitions: int = 20) -> VM:
        return self.directory.get(ref, transitions)

    def _get(self, vm_id: str) -> VM:
        return self.get(vm_id, transitions=0)

    def paths(self, vm_id: str) -> VMPaths:
        return self.directory.paths(vm_id)

    def vmm(self, vm_id: str) -> VMM | None:
        return self.directory.vmm(vm_id)

    def driver_for(self, spec: VMSpec) -> Driver:
        try:
            return self.drivers[spec.hypervisor.value]
        except KeyError:
            raise InvalidSpec(
                "hypervisor", f"{spec.hypervisor.value!r} is not configured on this agent"
            ) from None

    async def wait_settled(self, vm_id: str, timeout_s: float) -> VM:
        """Wait until the VM leaves starting/restarting/stopping (or the timeout passes)."""
        transient = {S.STARTING, S.RESTARTING, S.STOPPING}
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s), self._changed:
                await self._changed.wait_for(lambda: self._get(vm_id).state not in transient)
        return self.get(vm_id)

    # ------------------------------------------------------------------------------ create

    def validate_host(self, spec: VMSpec) -> None:
        """Checks that need the host: the hypervisor can run this spec, and every file it
        names is an image in a pool (the driver's check, which names the field)."""
        driver = self.driver_for(spec)
        try:
            driver.check(spec)
        except ImageRejected as exc:
            raise InvalidSpec(exc.field, str(exc).split(": ", 1)[1]) from exc
        except (DriverUnavailable, Unsupported) as exc:
            raise InvalidSpec("hypervisor", str(exc)) from exc

    async def create(self, spec: VMSpec) -> VM:
        for defaults in self.spec_defaults:
            spec = defaults.complete(spec)
        self.validate_host(spec)
        for check in self.create_checks:
            check.check_create(spec)
        if self.vms.get(spec.name) is not None:
            raise Conflict(f"a VM named {spec.name!r} already exists")
        now = self.clock()
        vm = VM(
            id=uuid.uuid4().hex[:16],
            name=spec.name,
            spec=spec,
            state=S.PENDING,
            state_reason="created",
            state_since=now,
            created_at=now,
        )
        try:
            self.vms.insert(vm)
        except NameTaken:
            raise Conflict(f"a VM named {spec.name!r} already exists") from None
        self.events.publish(EventType.VM_CREATED, f"{vm.name}: created", vm.id, name=vm.name)
        return self.get(vm.id)

    # ------------------------------------------------------------------------- update

    def complete_spec(self, spec: VMSpec) -> VMSpec:
        """The spec as create would store it: what the request left out filled in (the
        network above all), so a declared spec compares equal to the stored one."""
        for defaults in self.spec_defaults:
            spec = defaults.complete(spec)
        return spec

    def check_spec(self, spec: VMSpec) -> VMSpec:
        """Create's validation without the write: completed, checked against the host and
        by every create check; raises InvalidSpec or Conflict naming the field."""
        spec = self.complete_spec(spec)
        self.validate_host(spec)
        for check in self.create_checks:
            check.check_create(spec)
        return spec

    async def update_spec(self, ref: str, spec: VMSpec, reason: str = "spec updated") -> VM:
        """Replace a VM's stored spec in place, validated as create validates one.

        A VM without a VMM (pending, stopped, error) takes any change, for its next start.
        A VM whose VMM runs takes only the live fields (``domain.spec_changes``): its VMM,
        its re-adoption and its capacity reservation were made from the stored spec, so a
        change that needs a restart is refused (stop it, or restart it with the change).
        New probes reach a running VM's health checks at once."""
        vm = self.get(ref, 0)
        _refuse_unreadable(vm)
        if spec.name != vm.name:
            raise InvalidSpec("name", f"a VM cannot be renamed (this one is {vm.name!r})")
        spec = self.check_spec(spec)
        async with self._lock(vm.id):
            vm = self._get(vm.id)
            changed = changed_fields(vm.spec, spec)
            if not changed:
                return self.get(vm.id)
            if vm.state in ACTIVE_STATES:
                needs = restart_fields(vm.spec, spec)
                if needs:
                    raise Conflict(
                        f"{vm.name} is {vm.state.value}: {', '.join(needs)} can only change "
                        "with a restart; stop the VM first, or restart it with the change",
                        current_state=vm.state.value,
                    )
            self.vms.update_spec(vm.id, spec)
            self.events.publish(
                EventType.VM_UPDATED,
                f"{vm.name}: {reason} ({', '.join(changed)})",
                vm.id,
                name=vm.name,
                changed=changed,
            )
            vmm = self.directory.vmm(vm.id)
            if "probes" in changed and vm.state == S.RUNNING and vmm is not None:
                await self._notify_up(vm.id, vmm)
        return self.get(vm.id)

    # ------------------------------------------------------------------------------- start

    def _lock(self, vm_id: str) -> asyncio.Lock:
        return self._locks.setdefault(vm_id, asyncio.Lock())

    def exclusive(self, vm_id: str) -> asyncio.Lock:
        """The VM's operation lock: hold it to keep start, stop, restart and delete out while
        working on the VM's VMM or disks (a snapshot does)."""
        return self._lock(vm_id)

    async def start(
        self, ref: str, reason: str = "start requested", restore_from: Path | None = None
    ) -> VM:
        """Start a pending or stopped VM; with ``restore_from``, resume saved VMM state instead
        of booting (the snapshot service restores disks first)."""
        vm = self.get(ref, 0)
        _refuse_unreadable(vm)
        async with self._lock(vm.id):
            vm = self._get(vm.id)
            check_action(Action.START, vm.state)
            await self._start_locked(vm, reason, restore_from)
        return self.get(vm.id)

    async def _start_locked(self, vm: VM, reason: str, restore_from: Path | None = None) -> None:
        self.validate_host(vm.spec)
        for guard in self.start_guards:
            try:
                await guard.before_start(vm)
            except StartVeto as exc:
                self.events.publish(
                    EventType.VM_START_VETOED, f"{vm.name}: start vetoed: {exc}", vm.id
                )
                raise Conflict(f"start of {vm.name} vetoed by a pre-start hook: {exc}") from exc
        # the reservation and ``starting`` in one commit (a refused reservation leaves nothing
        # written), not waited onto the disk: what must outlive a power cut is what stays
        # true after one, and a power cut ends the VMM this start makes
        reserve = functools.partial(self.gate.reserve, vm)
        await self.set_state(vm.id, S.STARTING, reason, (reserve,), durable=False)
        try:
            await self._spawn(vm, boot_state=S.STARTING, restore_from=restore_from)
        except BaseException:
            self.gate.release(vm.id)
            raise

    async def _spawn(self, vm: VM, boot_state: VMState, restore_from: Path | None = None) -> None:
        """Spawn a VMM, persist its identity at once, then hand it to a supervisor."""
        paths = self.paths(vm.id)
        driver = self.driver_for(vm.spec)
        limits = self.boot_limits.boot_limits(vm, driver.capabilities) if self.boot_limits else None
        identity = self.identities.identity(vm) if self.identities else None
        launched = functools.partial(self._launched, vm)
        try:
            attachment = await self.network.attach(vm) if self.network else None
            boot = BootOptions(io_limits=limits, network=attachment, identity=identity)
            warm = None
            if restore_from is None and self.warm is not None:
                warm = await self._warm_spawn(vm, driver, paths, boot)
            if warm is not None:
                vmm = warm
            elif restore_from is not None:
                vmm = await driver.restore(vm.id, vm.spec, paths, restore_from, boot, launched)
            else:
                vmm = await driver.spawn(vm.id, vm.spec, paths, boot, launched)
        except (DriverError, Unsupported, NetworkError) as exc:
            what = "restoring the VMM failed" if restore_from else "VMM failed to start"
            forget = functools.partial(self.vms.set_process, vm.id, None)
            release = functools.partial(self.gate.release, vm.id)
            await self.set_state(vm.id, S.ERROR, f"{what}: {exc}", (forget, release))
            return
        self._own(vm, vmm, boot_state, restored=restore_from is not None or warm is not None)

    async def _launched(self, vm: VM, vmm: VMM) -> None:
        """The VMM process exists and its guest has touched nothing yet: write its identity
        down at once (an agent dying now re-adopts it), then the spawn observers (its cgroup,
        before the guest's memory, booted or restored, is charged anywhere else)."""
        self.vms.set_process(vm.id, vmm.record, durable=False)
        for observer in self.spawn_observers:
            try:
                await observer.vmm_spawned(vm, vmm.record.pid)
            except Exception:
                log.exception("a spawn observer failed", extra={"vm": vm.name})

    async def _warm_spawn(
        self, vm: VM, driver: Driver, paths: VMPaths, boot: BootOptions
    ) -> VMM | None:
        """Resume the VM's boot snapshot, if it has a valid one; on any failure discard it
        (with the reason) so the caller boots cold."""
        assert self.warm is not None
        snapshot = await self.warm.warm_state(vm)
        if snapshot is None:
            return None
        # the checksum is read while the hypervisor loads the state; the guest runs only
        # once both are done and the checksum matches
        verified = asyncio.create_task(self.warm.verify(vm, snapshot))
        boot = replace(boot, restore_timeout_s=self.warm.restore_timeout_s, resume_restored=False)
        launched = functools.partial(self._launched, vm)
        try:
            vmm = await driver.restore(vm.id, vm.spec, paths, snapshot.state, boot, launched)
        except (DriverError, Unsupported) as exc:
            self.vms.set_process(vm.id, None)
            if await verified:
                self.warm.failed(vm, str(exc))
            return None
        try:
            if not await verified:
                raise DriverError("checksum mismatch")
            await vmm.resume()
        except (DriverError, Unsupported) as exc:
            await self._discard_vmm(vmm)
            self.vms.set_process(vm.id, None)
            if verified.result():
                self.warm.failed(vm, str(exc))
            return None
        self.events.publish(EventType.VM_WARM_START, f"{vm.name}: resumed its boot snapshot", vm.id)
        return vmm

    async def _discard_vmm(self, vmm: VMM) -> None:
        """End a VMM nobody owns yet (its pid is not written down): kill, reap, close."""
        await vmm.kill()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(vmm.exit_signal().exited), KILL_WAIT_S)
        await vmm.close()

    def _own(self, vm: VM, vmm: VMM, boot_state: VMState | None, restored: bool = False) -> None:
        owned = self.directory.own(vm.id, vmm)
        self._spawn_task(self._supervise(vm.id, vmm, owned.watch, boot_state, restored))

    def _spawn_task(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _owns(self, vm_id: str, vmm: VMM) -> bool:
        owned = self.directory.owned(vm_id)
        return owned is not None and owned.vmm is vmm

    # ------------------------------------------------------------------------- supervisor

    async def _supervise(
        self,
        vm_id: str,
        vmm: VMM,
        watch: ExitSignal,
        boot_state: VMState | None,
        restored: bool = False,
    ) -> None:
        """Own one VMM: see it to ready (if booting), then handle its exit."""
        if boot_state is not None:
            vm = self._get(vm_id)
            # a restored guest will not print its boot marker again, and the driver's restore
            # returns only once it runs (the warm path resumes it before handing it over)
            waiting = _already() if restored else vmm.wait_ready(vm.spec.boot_timeout_s)
            ready = asyncio.create_task(waiting)
            pending: set[asyncio.Future[Any]] = {ready, watch.exited}
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if not ready.done():
                ready.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await ready
            elif ready.exception() is not None and not watch.exited.done():
                await self._boot_failed(vm_id, vmm, watch, str(ready.exception()))
                return
            elif ready.exception() is None:
                up = False
                async with self._lock(vm_id):
                    if self._owns(vm_id, vmm) and self._get(vm_id).state == boot_state:
                        done = "restarted" if boot_state == S.RESTARTING else "guest ready"
                        # not waited onto the disk, as ``starting``: a power cut ends the VMM,
                        # so ``running`` can never be what is true after one
                        await self.set_state(vm_id, S.RUNNING, done, durable=False)
                        await self._notify_up(vm_id, vmm)
                        up = True
                if up:
                    await self._notify_ready(vm_id, vmm, restored)
        with contextlib.suppress(asyncio.CancelledError):
            status = await watch.exited
            await self._vmm_exited(vm_id, vmm, status)

    async def _notify_ready(self, vm_id: str, vmm: VMM, restored: bool) -> None:
        """A cold-booted guest is ready: observers run under the VM's lock (a boot snapshot
        pauses and saves it; no stop may come between). A resumed one: outside it (telling
        it the time waits on the guest, and a stop must not wait for that)."""
        async with self._lock(vm_id) if not restored else contextlib.nullcontext():
            if not self._owns(vm_id, vmm) or self._get(vm_id).state != S.RUNNING:
                return
            vm = self._get(vm_id)
            for observer in self.ready_observers:
                try:
                    await observer.guest_ready(vm, vmm, restored)
                except Exception:
                    log.exception("a ready observer failed", extra={"vm": vm.name})

    async def _notify_up(self, vm_id: str, vmm: VMM) -> None:
        vm = self._get(vm_id)
        for observer in self.vmm_observers:
            try:
                await observer.vmm_up(vm, vmm)
            except Exception as exc:
                log.exception("on_vmm_up listener failed")
                self.events.publish(
                    EventType.VM_SETUP_FAILED, f"{vm.name}: setup after start failed: {exc}", vm_id
                )

    async def _boot_failed(self, vm_id: str, vmm: VMM, watch: ExitSignal, reason: str) -> None:
        async with self._lock(vm_id):
            if not self._owns(vm_id, vmm):
                return
            await vmm.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(watch.exited), KILL_WAIT_S)
            await self._disown(vm_id)
            await self.set_state(vm_id, S.ERROR, reason)

    async def _vmm_exited(self, vm_id: str, vmm: VMM, status: ExitStatus) -> None:
        """The VMM died on its own: record it first (the state, the cleared process record
        and, for a guest power-off, the released reservation in one commit), then close the
        VMM's connections, so detection costs no more than one write."""
        async with self._lock(vm_id):
            if not self._owns(vm_id, vmm):
                return  # an operation that ended it on purpose handles it
            self.directory.disown(vm_id)
            vm = self._get(vm_id)
            forget = functools.partial(self.vms.set_process, vm_id, None)
            clean = vmm.powered_off_by_guest() and status.code in (0, None)
            try:
                if vm.state == S.RUNNING and clean:
                    release = functools.partial(self.gate.release, vm_id)
                    await self.set_state(vm_id, S.STOPPED, "guest powered off", (forget, release))
                elif vm.state == S.STARTING:
                    reason = f"{status.describe()} during boot"
                    await self.set_state(vm_id, S.ERROR, reason, (forget,))
                elif vm.state in (S.RUNNING, S.RESTARTING):
                    await self.set_state(vm_id, S.ERROR, status.describe(), (forget,))
                else:
                    forget()
            finally:
                await vmm.close()

    async def _disown(self, vm_id: str) -> OwnedVMM | None:
        owned = self.directory.disown(vm_id)
        if owned is not None:
            await owned.vmm.close()
            self.vms.set_process(vm_id, None)
        return owned

    # -------------------------------------------------------------------------------- stop

    async def stop(
        self, ref: str, graceful: bool = True, timeout_s: float | None = None, reason: str = ""
    ) -> VM:
        vm = self.get(ref, 0)
        _refuse_unreadable(vm)
        if vm.state == S.STOPPING and not graceful:
            # escalate a graceful stop already under way
            owned = self.directory.owned(vm.id)
            if owned is not None:
                await owned.vmm.kill()
            return await self.wait_settled(vm.id, KILL_WAIT_S)
        async with self._lock(vm.id):
            vm = self._get(vm.id)
            check_action(Action.STOP, vm.state)
            owned = self.directory.owned(vm.id)
            if vm.state == S.ERROR:
                await self._cleanup_error(vm)
            elif not graceful and owned is not None:
                await self._kill_now(vm, owned, reason or _stop_reason(graceful))
            else:
                # not waited onto the disk: the commit of ``stopped`` that ends this stop
                # fsyncs the log with it (an agent crash loses nothing committed)
                stopping = reason or _stop_reason(graceful)
                await self.set_state(vm.id, S.STOPPING, stopping, durable=False)
                outcome = await self._end_vmm(vm, graceful, timeout_s, forget=False)
                along = (
                    functools.partial(self.vms.set_process, vm.id, None),
                    functools.partial(self.gate.release, vm.id),
                )
                await self.set_state(vm.id, S.STOPPED, outcome, along)
        return self.get(vm.id)

    async def _kill_now(self, vm: VM, owned: OwnedVMM, reason: str) -> None:
        """A forced stop. SIGKILL cannot be refused, so both transitions and the cleared
        process record are written down (one transaction) while the kernel tears the VMM down;
        the events go out, and the caller is answered, once it is gone. An agent killed in
        between finds the VM stopped and no VMM to adopt (a dying one is an orphan it ends)."""
        self.directory.disown(vm.id)
        await owned.vmm.kill()
        along = (
            functools.partial(self.vms.set_process, vm.id, None),
            functools.partial(self.gate.release, vm.id),
        )
        with self.vms.db.write():  # both transitions in one transaction, one fsync
            changes = (
                self._record_state(vm.id, S.STOPPING, reason),
                self._record_state(vm.id, S.STOPPED, "forced stop: VMM killed", along),
            )
        try:
            await asyncio.wait_for(asyncio.shield(owned.watch.exited), KILL_WAIT_S)
        except TimeoutError:
            pid = owned.vmm.record.pid
            self.events.deliver(
                self.events.record(
                    EventType.VM_WATCHDOG,
                    f"{vm.name}: VMM pid {pid} still not gone {KILL_WAIT_S:g} s after "
                    "SIGKILL (stuck in uninterruptible I/O?)",
                    vm.id,
                    name=vm.name,
                    pid=pid,
                )
            )
        for change in changes:
            await self._publish(change)
        self._spawn_task(owned.vmm.close())
        self._cleanup_files(vm.id)

    async def _cleanup_error(self, vm: VM) -> None:
        """error -> stopped: make sure no VMM is left, release what it held."""
        await self._end_vmm(vm, graceful=False, timeout_s=0)
        self._kill_recorded_process(vm)
        self.gate.release(vm.id)
        await self.set_state(vm.id, S.STOPPED, "cleaned up after error")

    def _kill_recorded_process(self, vm: VM) -> None:
        record = self.vms.get(vm.id)
        process = record.process if record else None
        if process and is_same_live_process(process.pid, process.start_time):
            kill(process.pid)
        self.vms.set_process(vm.id, None)

    async def _end_vmm(
        self, vm: VM, graceful: bool, timeout_s: float | None, forget: bool = True
    ) -> str:
        """Take the VMM from its supervisor and end it; return how it ended. ``forget``
        clears its process record now; a caller that records the outcome clears it in the
        same commit instead (and the VMM's handle is closed in the background)."""
        owned = self.directory.disown(vm.id)
        if owned is None:
            return "no VMM was running"
        vmm, watch = owned.vmm, owned.watch
        timeout = vm.spec.stop_timeout_s if timeout_s is None else timeout_s
        outcome = "forced stop: VMM killed"
        if graceful and timeout > 0 and not watch.exited.done():
            try:
                await vmm.request_shutdown()
                await asyncio.wait_for(asyncio.shield(watch.exited), timeout)
                outcome = "guest shut down gracefully"
            except TimeoutError:
                outcome = f"graceful stop timed out after {timeout:g} s: VMM killed"
            except (DriverError, Unsupported) as exc:
                outcome = f"graceful stop not possible ({exc}): VMM killed"
        if not watch.exited.done():
            await vmm.kill()
            try:
                await asyncio.wait_for(asyncio.shield(watch.exited), KILL_WAIT_S)
            except TimeoutError:
                outcome += f" (still not gone after {KILL_WAIT_S:g} s)"
        if forget:
            await vmm.close()
            self.vms.set_process(vm.id, None)
        else:
            # the caller records the outcome first; the dead VMM's connections are let go
            # of after that, off the request's path
            self._spawn_task(vmm.close())
        self._cleanup_files(vm.id)
        return outcome

    def _cleanup_files(self, vm_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.paths(vm_id).control_socket.unlink()

    # ---------------------------------------------------------------------------- abort

    async def abort(self, ref: str, reason: str) -> VM:
        """Kill the VMM of a VM that is stuck (a watchdog) or given up on, and record an error.

        Only from starting, restarting or running; any other state is left alone.
        """
        vm = self.get(ref, 0)
        async with self._lock(vm.id):
            vm = self._get(vm.id)
            if vm.state not in (S.STARTING, S.RESTARTING, S.RUNNING):
                return vm
            await self._end_vmm(vm, graceful=False, timeout_s=0)
            await self.set_state(vm.id, S.ERROR, reason)
        return self.get(vm.id)

    # ----------------------------------------------------------------------------- restart

    async def restart(
        self, ref: str, graceful: bool = True, reason: str = "restart requested"
    ) -> VM:
        vm = self.get(ref, 0)
        _refuse_unreadable(vm)
        async with self._lock(vm.id):
            vm = self._get(vm.id)
            check_action(Action.RESTART, vm.state)
            if vm.state == S.ERROR:
                await self._cleanup_error(vm)
                vm = self._get(vm.id)
            if vm.state == S.STOPPED:
                await self._start_locked(vm, reason)
            else:
                await self.set_state(vm.id, S.RESTARTING, reason)
                await self._end_vmm(vm, graceful, None)
                await self._spawn(self._get(vm.id), boot_state=S.RESTARTING)
        return self.get(vm.id)

    # ------------------------------------------------------------------------------ delete

    async def delete(
        self, ref: str, force: bool = False, snapshots: SnapshotsOnDelete | None = None
    ) -> None:
        """Delete a VM (pending, stopped or error; ``force`` kills a running one first) and
        its files. A VM with snapshots needs ``snapshots`` ("keep" or "delete"): snapshots
        are backups and never go silently. The VM's snapshot lock is taken first, the order
        snapshot work takes them in, so a snapshot being taken either finishes first (and
        counts) or finds the VM gone."""
        vm = self.get(ref, 0)
        snapshot_lock = self.vm_snapshots.vm_lock(vm.id) if self.vm_snapshots else None
        async with snapshot_lock or contextlib.nullcontext(), self._lock(vm.id):
            vm = self._get(vm.id)
            running = vm.state not in (S.PENDING, S.STOPPED, S.ERROR)
            if running and not force:
                raise IllegalAction(Action.DELETE, vm.state)
            if vm.unreadable is not None and not force:
                process = vm.process
                if process and is_same_live_process(process.pid, process.start_time):
                    raise Conflict(
                        f"{vm.name}'s record is unreadable and its VMM (pid {process.pid}) still "
                        "runs: delete with force to kill it, or restore the database"
                    )
            if self.vm_snapshots is not None:
                self.vm_snapshots.check_delete(vm, snapshots)
            if running:
                await self._end_vmm(vm, graceful=False, timeout_s=0)
            self._kill_recorded_process(vm)
            self.gate.release(vm.id)
            if self.vm_snapshots is not None:
                await self.vm_snapshots.on_delete(vm, snapshots)
            root = self.paths(vm.id).root
            await asyncio.to_thread(shutil.rmtree, root, ignore_errors=True)
            self.vms.delete(vm.id)
            self.events.publish(EventType.VM_DELETED, f"{vm.name}: deleted", vm.id, name=vm.name)
        self._locks.pop(vm.id, None)

    # ------------------------------------------------------------------------------ health

    # ---------------------------------------------------------------- agent start and stop

    async def recover(self) -> None:
        """Re-adopt every VMM that outlived the previous agent; mark the dead ones."""
        for vm in self.vms.all():
            if vm.state not in ACTIVE_STATES:
                continue
            try:
                await self._recover_one(vm)
            except Exception as exc:  # one bad VM must not stop the agent
                log.exception("recovery failed", extra={"vm": vm.name})
                with contextlib.suppress(Exception):
                    await self._recovery_failed(vm.id, exc)

    async def _recovery_failed(self, vm_id: str, exc: Exception) -> None:
        """A VM that was being stopped is stopped (its VMM killed: the operator asked for
        that, and stopping -> error is no transition); any other is an error."""
        vm = self._get(vm_id)
        if vm.state == S.STOPPING:
            self.directory.disown(vm_id)
            self._kill_recorded_process(vm)
            release = functools.partial(self.gate.release, vm_id)
            why = f"stop finished after agent restart (re-adoption failed: {exc}); VMM killed"
            await self.set_state(vm_id, S.STOPPED, why, (release,))
        else:
            await self.set_state(vm_id, S.ERROR, f"recovery after agent restart failed: {exc}")

    async def _recover_one(self, vm: VM) -> None:
        paths = self.paths(vm.id)
        record = vm.process
        if record is None:
            record = self._find_orphan(vm, paths)
        alive = record is not None and is_same_live_process(record.pid, record.start_time)
        if not alive or record is None:
            self.vms.set_process(vm.id, None)
            gone = "VMM exited while the agent was down"
            if vm.state == S.STOPPING:
                self.gate.release(vm.id)
                await self.set_state(vm.id, S.STOPPED, gone)
            else:
                await self.set_state(vm.id, S.ERROR, gone)
            return
        driver = self.driver_for(vm.spec)
        try:
            vmm = await driver.adopt(vm.spec, paths, record)
        except DriverError as exc:
            kill(record.pid)
            self.vms.set_process(vm.id, None)
            target = S.STOPPED if vm.state == S.STOPPING else S.ERROR
            await self.set_state(vm.id, target, f"could not re-adopt the VMM ({exc}); killed it")
            return
        self.events.publish(
            EventType.VM_ADOPTED, f"{vm.name}: re-adopted VMM pid {record.pid}", vm.id
        )
        if vm.state == S.RUNNING:
            self._own(vm, vmm, boot_state=None)
            await self._notify_up(vm.id, vmm)
        elif vm.state in (S.STARTING, S.RESTARTING):
            self._own(vm, vmm, boot_state=vm.state)
        elif vm.state == S.STOPPING:
            self._own(vm, vmm, boot_state=None)
            outcome = await self._end_vmm(vm, graceful=False, timeout_s=0)
            self.gate.release(vm.id)
            await self.set_state(vm.id, S.STOPPED, f"stop finished after agent restart: {outcome}")

    def _find_orphan(self, vm: VM, paths: VMPaths) -> ProcessRecord | None:
        """A VMM spawned just before the agent died, before its pid was written down."""
        return self.driver_for(vm.spec).orphan(vm.id, paths)

    async def shutdown(self) -> None:
        """The agent is stopping: let go of every VMM without touching it."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for vm_id, owned in self.directory.owned_items():
            owned.watch.cancel()
            with contextlib.suppress(Exception):
                await owned.vmm.close()
            self.directory.disown(vm_id)


async def _already() -> None:
    """Ready at once (a restored VMM)."""


def _refuse_unreadable(vm: VM) -> None:
    """Only a deletion acts on a VM whose stored record cannot be decoded: its spec is a
    placeholder, and its recorded VMM must not be touched by anything else."""
    if vm.unreadable is not None:
        raise Conflict(
            f"{vm.name}'s stored record is unreadable ({vm.unreadable}); delete the VM "
            "(`stoker vm delete`) or restore the database from a backup (`stoker db restore`)",
            current_state=vm.state.value,
        )


def _stop_reason(graceful: bool) -> str:
    return "graceful stop requested" if graceful else "forced stop requested"
