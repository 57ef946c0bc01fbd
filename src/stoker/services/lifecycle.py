"""The lifecycle service: the single path for every VM state change.

Operators' requests and the agent's own loops (health, recovery, schedules) all come here.
Each VMM gets one supervisor task that owns it from spawn to exit; an operation that ends a
VMM on purpose (stop, restart, delete) first takes the handle away from its supervisor, so an
exit is handled exactly once, by whoever owns the VMM at that moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from stoker.domain.events import EventType
from stoker.domain.spec import VMSpec
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
    BootFailed,
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
    VMPaths,
)
from stoker.host.proc import (
    ExitStatus,
    find_processes_with_arg,
    is_same_live_process,
    kill,
    read_start_time,
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


class SpecDefaults(Protocol):
    def complete(self, spec: VMSpec) -> VMSpec:
        """Fill in what the request left out (``spec.model_fields_set`` says what it gave):
        the network, above all, is the host's default network when the request names none."""


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
        self.clock = clock or (lambda: datetime.now(UTC))
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._changed = asyncio.Condition()

    # ----------------------------------------------------------------- the one path for state

    async def set_state(self, vm_id: str, to: VMState, reason: str) -> VM:
        """Check the transition table, persist with reason and UTC time, publish an event."""
        vm = self._get(vm_id)
        if not (vm.state == to == S.ERROR):  # error -> error only restates why (give-up)
            check_transition(vm.state, to)
        at = self.clock()
        if not self.vms.compare_and_set_state(vm_id, vm.state, to, reason, at):
            raise Conflict(f"{vm.name} changed state while {to.value} was being recorded; retry")
        self.events.publish(
            EventType.VM_STATE,
            f"{vm.name}: {vm.state.value} -> {to.value}: {reason}",
            vm_id,
            name=vm.name,
            from_state=vm.state.value,
            to_state=to.value,
            reason=reason,
        )
        async with self._changed:
            self._changed.notify_all()
        return self._get(vm_id)

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
        """Checks that need the host: files exist, the hypervisor can run this spec."""
        for field, path in (("kernel", spec.kernel), ("initrd", spec.initrd)):
            if path is not None and not Path(path).is_file():
                raise InvalidSpec(field, f"no such file: {path}")
        for index, drive in enumerate(spec.drives):
            if not Path(drive.path).is_file():
                raise InvalidSpec(f"drives[{index}].path", f"no such file: {drive.path}")
        driver = self.driver_for(spec)
        try:
            driver.check(spec)
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
        self.gate.reserve(vm)
        try:
            await self.set_state(vm.id, S.STARTING, reason)
            await self._spawn(vm, boot_state=S.STARTING, restore_from=restore_from)
        except BaseException:
            self.gate.release(vm.id)
            raise

    async def _spawn(self, vm: VM, boot_state: VMState, restore_from: Path | None = None) -> None:
        """Spawn a VMM, persist its identity at once, then hand it to a supervisor."""
        paths = self.paths(vm.id)
        driver = self.driver_for(vm.spec)
        limits = self.boot_limits.boot_limits(vm, driver.capabilities) if self.boot_limits else None
        try:
            attachment = await self.network.attach(vm) if self.network else None
            boot = BootOptions(io_limits=limits, network=attachment)
            if restore_from is not None:
                vmm = await driver.restore(vm.id, vm.spec, paths, restore_from, boot)
            else:
                vmm = await driver.spawn(vm.id, vm.spec, paths, boot)
        except (DriverError, Unsupported, NetworkError) as exc:
            what = "restoring the VMM failed" if restore_from else "VMM failed to start"
            await self.set_state(vm.id, S.ERROR, f"{what}: {exc}")
            self.gate.release(vm.id)
            return
        self.vms.set_process(vm.id, vmm.record)
        for observer in self.spawn_observers:
            try:
                await observer.vmm_spawned(vm, vmm.record.pid)
            except Exception:
                log.exception("a spawn observer failed", extra={"vm": vm.name})
        self._own(vm, vmm, boot_state, restored=restore_from is not None)

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
            # a restored guest will not print its boot marker again: running is ready
            waiting = (
                _wait_running(vmm, vm.spec.boot_timeout_s)
                if restored
                else vmm.wait_ready(vm.spec.boot_timeout_s)
            )
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
                async with self._lock(vm_id):
                    if self._owns(vm_id, vmm) and self._get(vm_id).state == boot_state:
                        done = "restarted" if boot_state == S.RESTARTING else "guest ready"
                        await self.set_state(vm_id, S.RUNNING, done)
                        await self._notify_up(vm_id, vmm)
        with contextlib.suppress(asyncio.CancelledError):
            status = await watch.exited
            await self._vmm_exited(vm_id, vmm, status)

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
        async with self._lock(vm_id):
            if not self._owns(vm_id, vmm):
                return  # an operation that ended it on purpose handles it
            await self._disown(vm_id)
            vm = self._get(vm_id)
            clean = vmm.powered_off_by_guest() and status.code in (0, None)
            if vm.state == S.RUNNING and clean:
                self.gate.release(vm_id)
                await self.set_state(vm_id, S.STOPPED, "guest powered off")
            elif vm.state == S.STARTING:
                await self.set_state(vm_id, S.ERROR, f"{status.describe()} during boot")
            elif vm.state in (S.RUNNING, S.RESTARTING):
                await self.set_state(vm_id, S.ERROR, status.describe())

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
        if vm.state == S.STOPPING and not graceful:
            # escalate a graceful stop already under way
            owned = self.directory.owned(vm.id)
            if owned is not None:
                await owned.vmm.kill()
            return await self.wait_settled(vm.id, KILL_WAIT_S)
        async with self._lock(vm.id):
            vm = self._get(vm.id)
            check_action(Action.STOP, vm.state)
            if vm.state == S.ERROR:
                await self._cleanup_error(vm)
            else:
                await self.set_state(vm.id, S.STOPPING, reason or _stop_reason(graceful))
                outcome = await self._end_vmm(vm, graceful, timeout_s)
                self.gate.release(vm.id)
                await self.set_state(vm.id, S.STOPPED, outcome)
        return self.get(vm.id)

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

    async def _end_vmm(self, vm: VM, graceful: bool, timeout_s: float | None) -> str:
        """Take the VMM from its supervisor and end it; return how it ended."""
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
        await vmm.close()
        self.vms.set_process(vm.id, None)
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

    async def delete(self, ref: str, force: bool = False) -> None:
        vm = self.get(ref, 0)
        async with self._lock(vm.id):
            vm = self._get(vm.id)
            if vm.state not in (S.PENDING, S.STOPPED, S.ERROR):
                if not force:
                    raise IllegalAction(Action.DELETE, vm.state)
                await self._end_vmm(vm, graceful=False, timeout_s=0)
            self._kill_recorded_process(vm)
            self.gate.release(vm.id)
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
                    await self.set_state(
                        vm.id, S.ERROR, f"recovery after agent restart failed: {exc}"
                    )

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
        for pid in find_processes_with_arg(str(paths.control_socket)):
            start = read_start_time(pid)
            if start is not None:
                return ProcessRecord(
                    pid=pid, start_time=start, control_socket=str(paths.control_socket)
                )
        return None

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


async def _wait_running(vmm: VMM, timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not (await vmm.status(timeout_s=max(0.1, deadline - loop.time()))).running:
        if loop.time() >= deadline:
            raise BootFailed(f"restored VM was not running within {timeout_s:g} s")
        await asyncio.sleep(0.01)


def _stop_reason(graceful: bool) -> str:
    return "graceful stop requested" if graceful else "forced stop requested"
