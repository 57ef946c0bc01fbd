"""Lifecycle hooks: exec commands, webhooks and Python callables run when a VM's life changes.

Configured in the agent config, section ``[hooks]``::

    [hooks]
    timeout_s = 10            # default per hook
    entry_points = true       # also call every callable in the entry-point group "stoker.hooks"

    [[hooks.hook]]
    events = ["on_start", "on_stop"]     # or "*" for all
    kind = "exec"                        # exec | webhook | python
    argv = ["/usr/local/bin/notify", "--quiet"]
    vms = ["web"]                        # optional: only these VM names
    labels = { tier = "web" }            # optional: only VMs with these labels

    [[hooks.hook]]
    events = ["pre_start"]
    kind = "webhook"
    url = "http://127.0.0.1:9000/allow"
    retries = 2
    veto = true                          # a failure here refuses the start

Events: ``pre_start`` (before a VMM is spawned; only there can ``veto`` refuse), ``on_start``
(running), ``on_stop`` (stopped), ``on_error``, ``on_state_change`` (every state change),
``on_health_check`` (every probe result), ``on_health_change`` (healthy/unhealthy/unknown),
``on_restart`` (an automatic restart begins).

Exec hooks get an argv (never a shell string), the JSON payload on stdin and in
``STOKER_PAYLOAD``, and ``STOKER_EVENT``, ``STOKER_VM_ID``, ``STOKER_VM_NAME``,
``STOKER_VM_ADDRESS``, ``STOKER_VM_PORTS``, ``STOKER_STATE``, ``STOKER_FROM_STATE``,
``STOKER_REASON`` and ``STOKER_HEALTH``; exit 0 is success. Webhooks POST the payload as JSON
and succeed on 2xx, retrying with backoff. Python hooks are ``fn(event: str, payload: dict)``
(sync or async); raising or returning False is a failure. Every result, good or bad, is a
``hook.result`` event. Apart from pre-start hooks, hooks run beside the lifecycle and never
hold it up; a pre-start hook holds a start for at most its timeout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from importlib.metadata import entry_points
from typing import Annotated, Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from stoker.domain.events import Event, EventType
from stoker.domain.vm import VM
from stoker.services.directory import VMDirectory
from stoker.services.errors import StartVeto
from stoker.services.events import EventBus
from stoker.services.probes import OUTPUT_TAIL, run_argv, vm_address, vm_environment

log = logging.getLogger("stoker.hooks")

HookEvent = Literal[
    "pre_start",
    "on_start",
    "on_stop",
    "on_error",
    "on_state_change",
    "on_health_check",
    "on_health_change",
    "on_restart",
]
ALL_EVENTS: tuple[str, ...] = HookEvent.__args__  # type: ignore[attr-defined]
ENTRY_POINT_GROUP = "stoker.hooks"
PythonHook = Callable[[str, dict[str, Any]], Any]
#: (passed, detail, extra event fields) of one hook run
Outcome = tuple[bool, str, dict[str, Any]]


class HookConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str | None = Field(default=None, max_length=128)
    events: list[str] = Field(default_factory=lambda: ["*"], max_length=256)
    kind: Literal["exec", "webhook", "python"]
    argv: list[Annotated[str, Field(max_length=4096)]] | None = Field(default=None, max_length=256)
    url: str | None = Field(default=None, max_length=2048)
    entry_point: str | None = Field(default=None, max_length=256)
    timeout_s: float | None = Field(default=None, gt=0, le=3600)
    retries: int = Field(default=2, ge=0, le=20)
    veto: bool = False
    vms: list[Annotated[str, Field(max_length=64)]] = Field(default_factory=list, max_length=1024)
    labels: dict[str, str] = Field(default_factory=dict, max_length=64)

    @field_validator("events", mode="before")
    @classmethod
    def _events(cls, v: Any) -> Any:
        events = [v] if isinstance(v, str) else v
        for event in events:
            if event != "*" and event not in ALL_EVENTS:
                raise ValueError(f"unknown hook event {event!r}; known: {', '.join(ALL_EVENTS)}")
        return events

    @model_validator(mode="after")
    def _complete(self) -> HookConfig:
        if self.kind == "exec" and not self.argv:
            raise ValueError("an exec hook needs argv (a list, never a shell string)")
        if self.kind == "webhook" and not (
            self.url and self.url.startswith(("http://", "https://"))
        ):
            raise ValueError("a webhook needs a url starting with http:// or https://")
        if self.kind == "python" and not self.entry_point:
            raise ValueError(f"a python hook needs entry_point (a name in {ENTRY_POINT_GROUP!r})")
        if self.veto and self.events != ["pre_start"]:
            raise ValueError("veto only applies to hooks with events = ['pre_start']")
        return self

    def label(self) -> str:
        if self.name:
            return self.name
        target = {"exec": (self.argv or [""])[0], "webhook": self.url, "python": self.entry_point}
        return f"{self.kind}:{target[self.kind]}"

    def wants(self, event: str, vm: VM) -> bool:
        if "*" not in self.events and event not in self.events:
            return False
        if self.vms and vm.name not in self.vms:
            return False
        return all(vm.spec.labels.get(k) == v for k, v in self.labels.items())


class HooksConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    timeout_s: float = Field(default=10.0, gt=0, le=3600)
    entry_points: bool = True
    hook: list[HookConfig] = Field(default_factory=list, max_length=256)

    @field_validator("hook", mode="before")
    @classmethod
    def _json(cls, v: Any) -> Any:
        # STOKER_HOOKS__HOOK='[{"kind": "exec", ...}]' from the environment
        return json.loads(v) if isinstance(v, str) else v


class HookService:
    """Runs the configured hooks for lifecycle and health events and records every result."""

    def __init__(
        self,
        directory: VMDirectory,
        events: EventBus,
        config: HooksConfig,
        *,
        python_hooks: dict[str, PythonHook] | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.directory = directory
        self.events = events
        self.config = config
        self.clock = clock or (lambda: datetime.now(UTC))
        self.python = python_hooks if python_hooks is not None else load_entry_points()
        named = {h.entry_point for h in config.hook if h.kind == "python" and h.entry_point}
        missing = sorted(n for n in named if n not in self.python)
        if missing:
            raise ValueError(
                f"hooks: no entry point named {', '.join(missing)} in group {ENTRY_POINT_GROUP!r}"
            )
        #: entry points not named by a configured hook get every event
        self.global_python = (
            {n: f for n, f in self.python.items() if n not in named} if config.entry_points else {}
        )
        self._tasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------------ dispatch

    def on_event(self, event: Event) -> None:
        """Map a published event to hook events (never hook.* events: no loops)."""
        if event.vm_id is None:
            return
        if event.type == EventType.VM_STATE:
            to = event.data.get("to_state")
            names = ["on_state_change"]
            names += {"running": ["on_start"], "stopped": ["on_stop"], "error": ["on_error"]}.get(
                str(to), []
            )
        elif event.type == EventType.VM_HEALTH:
            names = ["on_health_change"]
        elif event.type == EventType.VM_AUTO_RESTART:
            names = ["on_restart"]
        else:
            return
        vm = self.directory.find(event.vm_id)
        if vm is None:
            return
        for name in names:
            self.dispatch(name, vm, event.message, **event.data)

    def probe_result(self, vm: VM, probe: str, ok: bool, message: str) -> None:
        self.dispatch(
            "on_health_check", vm, message, probe=probe, ok=ok, result="pass" if ok else "fail"
        )

    def dispatch(self, hook_event: str, vm: VM, message: str = "", **data: Any) -> None:
        """Start every matching hook in the background."""
        payload = self.payload(hook_event, vm, message, **data)
        for hook in self.config.hook:
            if hook.wants(hook_event, vm):
                self._spawn(self.run(hook, hook_event, vm, payload))
        for name, fn in self.global_python.items():
            self._spawn(self._run_python_global(name, fn, hook_event, vm, payload))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def before_start(self, vm: VM) -> None:
        """Run pre-start hooks in order before a start; a failed veto hook refuses it."""
        payload = self.payload("pre_start", vm, "start requested")
        for hook in self.config.hook:
            if not hook.wants("pre_start", vm):
                continue
            ok, detail = await self.run(hook, "pre_start", vm, payload)
            if not ok and hook.veto:
                raise StartVeto(f"hook {hook.label()} refused: {detail}")
        for name, fn in self.global_python.items():
            try:
                await self._call_python(fn, "pre_start", payload, self.config.timeout_s)
            except StartVeto as exc:
                self._record(
                    f"python:{name}", "python", "pre_start", vm, False, f"vetoed: {exc}", 0.0
                )
                raise
            except Exception:  # recorded by the background path
                pass

    def payload(self, hook_event: str, vm: VM, message: str = "", **data: Any) -> dict[str, Any]:
        return {
            "event": hook_event,
            "at": self.clock().strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "message": message,
            "vm": {
                "id": vm.id,
                "name": vm.name,
                "state": vm.state.value,
                "state_reason": vm.state_reason,
                "address": vm_address(vm.spec),
                "labels": dict(vm.spec.labels),
                "restart_count": vm.restart_count,
            },
            "state": str(data.get("to_state") or vm.state.value),
            "from_state": data.get("from_state"),
            "reason": str(data.get("reason") or vm.state_reason),
            "health": data.get("to_health") or data.get("health"),
            "data": data,
        }

    # ---------------------------------------------------------------------- running

    async def run(
        self, hook: HookConfig, hook_event: str, vm: VM, payload: dict[str, Any]
    ) -> tuple[bool, str]:
        """Run one hook within its timeout; record the result as an event; (passed, detail)."""
        timeout = hook.timeout_s or self.config.timeout_s

        async def attempt() -> Outcome:
            if hook.kind == "exec":
                return await self._run_exec(hook, hook_event, vm, payload, timeout)
            if hook.kind == "webhook":
                return await self._run_webhook(hook, payload, timeout)
            fn = self.python[str(hook.entry_point)]
            return await self._run_python(fn, hook_event, payload, timeout)

        return await self._recorded(hook.label(), hook.kind, hook_event, vm, attempt)

    async def _recorded(
        self,
        label: str,
        kind: str,
        hook_event: str,
        vm: VM,
        attempt: Callable[[], Awaitable[Outcome]],
    ) -> tuple[bool, str]:
        """Time one hook run and record its result, whatever happens inside it."""
        began = time.monotonic()
        extra: dict[str, Any] = {}
        try:
            ok, detail, extra = await attempt()
        except Exception as exc:  # a broken hook is a failed hook, never a broken agent
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        self._record(label, kind, hook_event, vm, ok, detail, time.monotonic() - began, **extra)
        return ok, detail

    async def _run_exec(
        self, hook: HookConfig, hook_event: str, vm: VM, payload: dict[str, Any], timeout: float
    ) -> Outcome:
        assert hook.argv
        body = json.dumps(payload, default=str)
        env = vm_environment(
            vm,
            STOKER_EVENT=hook_event,
            STOKER_STATE=str(payload["state"]),
            STOKER_FROM_STATE=str(payload["from_state"] or ""),
            STOKER_REASON=str(payload["reason"]),
            STOKER_HEALTH=str(payload["health"] or ""),
            STOKER_PAYLOAD=body,
        )
        try:
            code, output = await run_argv(list(hook.argv), env, timeout, stdin=body.encode())
        except FileNotFoundError as exc:
            return False, str(exc), {"exit_code": None}
        tail = output.strip()[-OUTPUT_TAIL:]
        if code is None:
            return False, f"timed out after {timeout:g} s", {"exit_code": None, "output": tail}
        return code == 0, f"exit code {code}", {"exit_code": code, "output": tail}

    async def _run_webhook(
        self, hook: HookConfig, payload: dict[str, Any], timeout: float
    ) -> Outcome:
        assert hook.url
        detail = ""
        async with httpx.AsyncClient(timeout=timeout) as http:
            for attempt in range(hook.retries + 1):
                if attempt:
                    await asyncio.sleep(min(0.5 * 2 ** (attempt - 1), 10.0))
                try:
                    answer = await http.post(hook.url, json=payload)
                except httpx.HTTPError as exc:
                    detail = f"{type(exc).__name__}: {exc}".rstrip(": ")
                    continue
                detail = f"HTTP {answer.status_code}"
                extra = {"status": answer.status_code, "attempts": attempt + 1}
                if 200 <= answer.status_code < 300:
                    return True, detail, extra
                if answer.status_code < 500 and answer.status_code != 429:
                    return False, detail, extra  # the receiver said no: retrying will not help
        return False, f"{detail} after {hook.retries + 1} attempts", {"attempts": hook.retries + 1}

    async def _run_python(
        self, fn: PythonHook, hook_event: str, payload: dict[str, Any], timeout: float
    ) -> Outcome:
        try:
            result = await self._call_python(fn, hook_event, payload, timeout)
        except TimeoutError:
            return False, f"timed out after {timeout:g} s", {}
        if result is False:
            return False, "returned False", {}
        return True, "returned" if result is None else f"returned {result!r}"[:OUTPUT_TAIL], {}

    async def _call_python(
        self, fn: PythonHook, hook_event: str, payload: dict[str, Any], timeout: float
    ) -> Any:
        if asyncio.iscoroutinefunction(fn):
            return await asyncio.wait_for(fn(hook_event, payload), timeout)
        # a sync callable may block: keep it off the event loop
        return await asyncio.wait_for(asyncio.to_thread(fn, hook_event, payload), timeout)

    async def _run_python_global(
        self, name: str, fn: PythonHook, hook_event: str, vm: VM, payload: dict[str, Any]
    ) -> bool:
        if hook_event == "pre_start":
            return True  # pre_start is run in order by pre_start()
        ok, _ = await self._recorded(
            f"python:{name}",
            "python",
            hook_event,
            vm,
            lambda: self._run_python(fn, hook_event, payload, self.config.timeout_s),
        )
        return ok

    def _record(
        self,
        label: str,
        kind: str,
        hook_event: str,
        vm: VM,
        ok: bool,
        detail: str,
        duration_s: float,
        **extra: Any,
    ) -> None:
        verdict = "ok" if ok else "failed"
        self.events.publish(
            EventType.HOOK_RESULT,
            f"{vm.name}: {hook_event} hook {label} {verdict}: {detail}",
            vm.id,
            hook=label,
            kind=kind,
            hook_event=hook_event,
            ok=ok,
            detail=detail,
            duration_s=round(duration_s, 4),
            **extra,
        )

    # ---------------------------------------------------------------------- background

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        """Give running hooks a moment, then cancel them (the agent is stopping)."""
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=2.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def drain(self) -> None:
        """Wait for hooks already started (tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def load_entry_points() -> dict[str, PythonHook]:
    """Every callable in the ``stoker.hooks`` entry-point group, by name; broken ones logged."""
    found: dict[str, PythonHook] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            fn = ep.load()
        except Exception:
            log.exception("cannot load hook entry point %s", ep.name)
            continue
        if callable(fn):
            found[ep.name] = fn
    return found
