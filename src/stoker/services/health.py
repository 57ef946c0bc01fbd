"""Health monitoring: per-VM probe loops, the healthy/unhealthy/unknown verdict, and the wiring
of recovery (restart policy, watchdogs) and hooks into the agent.

Death needs no probe: the lifecycle sees a VMM's exit through a pidfd the moment it happens.
Probes are for the liveness of what is still alive: a hung VMM (SIGSTOP, a wedged QEMU) or a
guest whose service stopped answering. Each running VM gets one task per probe, started from
``lifecycle.on_vmm_up`` (a fresh start or a VMM re-adopted after an agent restart) and
cancelled the moment the VM leaves running. Every VM gets an implicit ``vmm`` probe unless its
spec has one (or ``implicit_vmm_probe = false``), which is what the original's 30 s
"process and socket" check should have been.

Configuration, agent section ``[health]`` (all optional)::

    [health]
    implicit_vmm_probe = true
    vmm_interval_s = 30        # the implicit probe's interval (the seed's 30 s)
    vmm_timeout_s = 1.0
    vmm_failure_threshold = 3
    starting_timeout_s = 300   # watchdogs, measured from entering the state
    stopping_timeout_s = 120   # -> forced stop
    restarting_timeout_s = 300 # -> error
    watchdog_interval_s = 1

Hooks are configured in ``[hooks]`` (see ``stoker.services.hooks``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Protocol

from pydantic import ConfigDict, Field, field_validator

from stoker.domain import health as verdicts
from stoker.domain.events import Event, EventType
from stoker.domain.health import Health, ProbeState, Result
from stoker.domain.spec import (
    ExecProbe,
    Probe,
    ProbeKind,
    VMMProbe,
    VMSpec,
    probe_target_problems,
)
from stoker.domain.states import VMState
from stoker.domain.vm import VM
from stoker.drivers.base import VMM
from stoker.services import probes as checks
from stoker.services.directory import VMDirectory, VMMLiveness
from stoker.services.errors import InvalidSpec
from stoker.services.events import EventBus
from stoker.services.recovery import WatchdogConfig
from stoker.store.health import HealthStore

log = logging.getLogger("stoker.health")


class ProbeObserver(Protocol):
    def probe_result(self, vm: VM, probe: str, ok: bool, message: str) -> None:
        """Every single probe result (hooks' ``on_health_check``); must not block."""


@dataclass(frozen=True)
class ProbeReport:
    """One probe's state with the settings it runs under (None for a retired probe)."""

    state: ProbeState
    probe: Probe | None


@dataclass(frozen=True)
class HealthReport:
    vm: VM
    health: Health
    vmm: VMMLiveness
    probes: tuple[ProbeReport, ...]
    consecutive_failures: int
    last_error: str | None
    since: datetime | None
    reason: str | None


class HealthConfig(WatchdogConfig):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    implicit_vmm_probe: bool = True
    vmm_interval_s: float = Field(default=30.0, gt=0, le=86_400)
    vmm_timeout_s: float = Field(default=1.0, gt=0, le=60)
    vmm_failure_threshold: int = Field(default=3, ge=1, le=1000)
    #: the commands exec probes may run, by name: a VM's spec chooses one, never an argv
    commands: dict[str, list[Annotated[str, Field(max_length=4096)]]] = Field(
        default_factory=dict, max_length=256
    )

    @field_validator("commands")
    @classmethod
    def _commands(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, argv in v.items():
            if not argv or not argv[0].startswith("/"):
                raise ValueError(f"command {name!r} must be an argv whose first item is absolute")
        return v


class AddressBook(Protocol):
    def address_of(self, vm_id: str) -> str | None:
        """The VM's own address on its managed network, or None."""


class HealthService:
    """Probe loops per running VM and the verdict; an unhealthy verdict is published as a
    ``vm.health`` event, which recovery acts on."""

    def __init__(
        self,
        directory: VMDirectory,
        events: EventBus,
        store: HealthStore,
        config: HealthConfig,
        probe_observers: Sequence[ProbeObserver] = (),
        addresses: AddressBook | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.directory = directory
        self.events = events
        self.store = store
        self.config = config
        self.probe_observers = tuple(probe_observers)
        self.addresses = addresses
        self.clock = clock or (lambda: datetime.now(UTC))
        self._tasks: dict[str, list[asyncio.Task[None]]] = {}
        self._probes: dict[str, dict[str, ProbeState]] = {}

    # ------------------------------------------------------------------------ create

    def check_create(self, spec: VMSpec) -> None:
        """Probes aim at the VM itself, and exec probes name a configured command."""
        problems = probe_target_problems(spec)
        for index, probe in enumerate(spec.probes):
            if isinstance(probe, ExecProbe) and probe.command not in self.config.commands:
                known = ", ".join(sorted(self.config.commands)) or "none are configured"
                problems.append(
                    (
                        f"probes[{index}].command",
                        f"no command {probe.command!r} in the agent's [health.commands] ({known})",
                    )
                )
        if problems:
            field, message = problems[0]
            raise InvalidSpec(field, message)

    # ------------------------------------------------------------------------ probes

    def probes_for(self, vm: VM) -> list[tuple[str, Probe]]:
        named = [(checks.probe_name(p, i), p) for i, p in enumerate(vm.spec.probes)]
        has_vmm = any(p.kind == ProbeKind.VMM for p in vm.spec.probes)
        if self.config.implicit_vmm_probe and not has_vmm:
            implicit = VMMProbe(
                kind=ProbeKind.VMM,
                name="vmm",
                interval_s=self.config.vmm_interval_s,
                timeout_s=self.config.vmm_timeout_s,
                failure_threshold=self.config.vmm_failure_threshold,
            )
            named.insert(0, ("vmm", implicit))
        return named

    async def vmm_up(self, vm: VM, vmm: VMM) -> None:
        """A VMM came up: (re)start this VM's probe loops against it."""
        self._stop_probes(vm.id)
        named = self.probes_for(vm)
        stored = {p.name: p for p in self.store.probes(vm.id)}
        self.store.drop_probes_except(vm.id, [n for n, _ in named])
        states: dict[str, ProbeState] = {}
        for name, probe in named:
            previous = stored.get(name)
            state = previous.reset() if previous else ProbeState(name=name, kind=probe.kind.value)
            states[name] = state
            self.store.save_probe(vm.id, state)
        self._probes[vm.id] = states
        self._set_verdict(vm, Health.UNKNOWN, "VMM up: waiting for probe results")
        self._tasks[vm.id] = [
            asyncio.ensure_future(self._loop(vm, vmm, name, probe)) for name, probe in named
        ]

    def _stop_probes(self, vm_id: str) -> None:
        for task in self._tasks.pop(vm_id, []):
            task.cancel()

    async def _loop(self, vm: VM, vmm: VMM, name: str, probe: Probe) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(probe.initial_delay_s)
        while True:
            began = loop.time()
            address = self.addresses.address_of(vm.id) if self.addresses else None
            outcome = await checks.check(probe, vm, vmm, self.config.commands, address)
            self.record(vm, name, probe, outcome.ok, outcome.message, outcome.duration_s)
            await asyncio.sleep(max(0.0, probe.interval_s - (loop.time() - began)))

    def record(
        self, vm: VM, name: str, probe: Probe, ok: bool, message: str, duration_s: float = 0.0
    ) -> ProbeState:
        """Fold one probe result in, persist it, and re-judge the VM."""
        states = self._probes.setdefault(vm.id, {})
        before = states.get(name) or ProbeState(name=name, kind=probe.kind.value)
        result = Result(ok=ok, message=message, at=self.clock(), duration_s=round(duration_s, 4))
        after = verdicts.record(before, result, probe.failure_threshold, probe.success_threshold)
        states[name] = after
        self.store.save_probe(vm.id, after)
        if after.status != before.status:
            log.info("%s probe %s: %s -> %s", vm.name, name, before.status, after.status)
        for observer in self.probe_observers:
            try:
                observer.probe_result(vm, name, ok, message)
            except Exception:
                log.exception("probe result observer failed")
        verdict = verdicts.overall(list(states.values()), running=True)
        if verdict == Health.UNHEALTHY:
            why = f"probe {name} failed {after.consecutive_failures} times: {after.last_error}"
            if after.status != Health.UNHEALTHY:
                bad = next(p for p in states.values() if p.status == Health.UNHEALTHY)
                why = f"probe {bad.name} failed {bad.consecutive_failures} times: {bad.last_error}"
        elif verdict == Health.HEALTHY:
            why = "all probes pass"
        else:
            why = "waiting for probe results"
        self._set_verdict(vm, verdict, why)
        return after

    def _set_verdict(self, vm: VM, health: Health, reason: str) -> None:
        previous = self.store.verdict(vm.id)
        was = previous[0] if previous else Health.UNKNOWN
        if previous is not None and was == health:
            return
        # derived from probe results and re-made by the next one: one commit with its event,
        # not waited onto the disk (it sits on the paths of stop and of death detection)
        with self.store.db.write(durable=False):
            self.store.set_verdict(vm.id, health, self.clock(), reason)
            if previous is None and health == Health.UNKNOWN:
                return  # nothing was known before either: not worth an event
            event = self.events.record(
                EventType.VM_HEALTH,
                f"{vm.name}: {was.value} -> {health.value}: {reason}",
                vm.id,
                name=vm.name,
                from_health=was.value,
                to_health=health.value,
                reason=reason,
            )
        self.events.deliver(event)

    # ------------------------------------------------------------------------ events

    def on_event(self, event: Event) -> None:
        """Stop probing the moment a VM leaves running; forget a deleted VM."""
        if event.vm_id is None:
            return
        if event.type == EventType.VM_DELETED:
            self._stop_probes(event.vm_id)
            self._probes.pop(event.vm_id, None)
            self.store.delete(event.vm_id)
        elif event.type == EventType.VM_STATE and event.data.get("to_state") != VMState.RUNNING:
            self._stop_probes(event.vm_id)
            vm = self.directory.find(event.vm_id)
            if vm is not None:
                self._set_verdict(vm, Health.UNKNOWN, f"VM is {vm.state.value}")

    # ------------------------------------------------------------------------ report

    async def report(self, vm: VM) -> HealthReport:
        vmm = await self.directory.vmm_liveness(vm.id)
        running = vm.state == VMState.RUNNING
        states = self._probes.get(vm.id) or {p.name: p for p in self.store.probes(vm.id)}
        probes = list(states.values())
        verdict = self.store.verdict(vm.id)
        health = verdict[0] if verdict and running else Health.UNKNOWN
        failures, last_error = verdicts.worst_error(probes)
        specs = dict(self.probes_for(vm))
        return HealthReport(
            vm=vm,
            health=health,
            vmm=vmm,
            probes=tuple(ProbeReport(p, specs.get(p.name)) for p in probes),
            consecutive_failures=failures,
            last_error=last_error,
            since=verdict[1] if verdict else None,
            reason=verdict[2] if verdict else None,
        )

    # ------------------------------------------------------------------------ background

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        tasks = [t for ts in self._tasks.values() for t in ts]
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
