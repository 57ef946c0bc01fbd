"""Hooks: configuration checks, exec environment and payload, webhook retries, Python callables,
the pre-start veto, and a result event for every run."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from stoker.domain.spec import VMSpec
from stoker.domain.states import VMState
from stoker.domain.vm import VM
from stoker.services.directory import VMDirectory
from stoker.services.errors import StartVeto
from stoker.services.events import EventBus
from stoker.services.hooks import HooksConfig, HookService
from stoker.store.db import Database
from stoker.store.events import EventStore
from stoker.store.vms import VMStore

NOW = datetime(2026, 11, 21, 6, 0, tzinfo=UTC)
DUMP_ENV = (
    "import json, os, sys; "
    "env = {k[7:]: v for k, v in os.environ.items() if k.startswith('STOKER_')};"
    "env.pop('PAYLOAD'); "
    "print(json.dumps({'env': env, 'name': json.loads(sys.stdin.read())['vm']['name']}))"
)


@pytest.fixture
def bus(tmp_path):
    db = Database(tmp_path / "s.db")
    yield EventBus(EventStore(db)), VMStore(db)
    db.close()


def vm(name: str = "web", **labels: str) -> VM:
    spec = VMSpec.model_validate(
        {
            "name": name,
            "kernel": "/k",
            "labels": labels,
            "network": {"mode": "user", "port_forwards": [{"host_port": 8080, "guest_port": 80}]},
        }
    )
    return VM("abcdef0123456789", name, spec, VMState.RUNNING, "guest ready", NOW, NOW)


def service(bus, hooks, python=None) -> HookService:
    events, vms = bus
    config = HooksConfig.model_validate({"hook": hooks})
    return HookService(
        VMDirectory(vms, Path("/nonexistent")), events, config, python_hooks=python or {}
    )


def results(bus) -> list:
    return bus[0].store.query(type="hook.result", limit=100)


def test_config_is_checked_with_messages_that_say_what_to_fix():
    with pytest.raises(ValidationError, match="unknown hook event 'on_boot'"):
        HooksConfig.model_validate({"hook": [{"kind": "exec", "argv": ["x"], "events": "on_boot"}]})
    with pytest.raises(ValidationError, match="needs argv"):
        HooksConfig.model_validate({"hook": [{"kind": "exec"}]})
    with pytest.raises(ValidationError, match="veto only applies"):
        HooksConfig.model_validate(
            {"hook": [{"kind": "exec", "argv": ["x"], "events": ["on_start"], "veto": True}]}
        )
    env_json = json.dumps([{"kind": "webhook", "url": "http://127.0.0.1:1/x"}])
    assert HooksConfig.model_validate({"hook": env_json}).hook[0].kind == "webhook"


def test_filters_by_event_name_and_labels():
    config = HooksConfig.model_validate(
        {"hook": [{"kind": "exec", "argv": ["x"], "events": ["on_start"], "labels": {"t": "a"}}]}
    )
    hook = config.hook[0]
    assert hook.wants("on_start", vm(t="a"))
    assert not hook.wants("on_stop", vm(t="a"))
    assert not hook.wants("on_start", vm(t="b"))


async def test_exec_hook_gets_env_and_payload_and_its_exit_code_is_recorded(bus):
    hooks = service(bus, [{"kind": "exec", "argv": [sys.executable, "-c", DUMP_ENV]}])
    hooks.dispatch(
        "on_error", vm(), "boom", from_state="running", to_state="error", reason="VMM killed"
    )
    await hooks.drain()
    [event] = results(bus)
    assert event.data["ok"] is True and event.data["exit_code"] == 0
    seen = json.loads(event.data["output"])
    assert seen["env"] == {
        "EVENT": "on_error",
        "VM_ID": "abcdef0123456789",
        "VM_NAME": "web",
        "STATE": "error",
        "FROM_STATE": "running",
        "REASON": "VMM killed",
        "HEALTH": "",
        "VM_ADDRESS": "127.0.0.1",
        "VM_PORTS": "80=127.0.0.1:8080",
    }
    assert seen["name"] == "web"  # the JSON payload on stdin


async def test_exec_hook_timeout_is_a_recorded_failure(bus):
    hooks = service(
        bus, [{"kind": "exec", "argv": ["/bin/sleep", "5"], "timeout_s": 0.2, "name": "slow"}]
    )
    began = asyncio.get_running_loop().time()
    hooks.dispatch("on_start", vm())
    await hooks.drain()
    assert asyncio.get_running_loop().time() - began < 2
    [event] = results(bus)
    assert event.data["ok"] is False and "timed out after 0.2 s" in event.data["detail"]
    assert event.message == "web: on_start hook slow failed: timed out after 0.2 s"


async def test_webhook_retries_server_errors_then_succeeds(bus):
    answers = [b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n"] * 2 + [
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    ]
    bodies: list[dict] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(
            next(
                line.split(b":")[1]
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
        )
        bodies.append(json.loads(await reader.readexactly(length)))
        writer.write(answers.pop(0))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    hooks = service(bus, [{"kind": "webhook", "url": f"http://127.0.0.1:{port}/h", "retries": 2}])
    hooks.dispatch("on_start", vm(), to_state="running")
    await hooks.drain()
    server.close()
    assert len(bodies) == 3 and bodies[0]["event"] == "on_start"
    assert bodies[0]["vm"]["id"] == "abcdef0123456789"
    [event] = results(bus)
    assert event.data["ok"] is True and event.data["attempts"] == 3


async def test_python_hooks_sync_and_async_and_failures(bus):
    seen: list[str] = []

    def sync_hook(event: str, payload: dict) -> None:
        seen.append(f"sync:{event}:{payload['vm']['name']}")

    async def failing(event: str, payload: dict) -> bool:
        return False

    hooks = service(
        bus,
        [{"kind": "python", "entry_point": "bad", "events": ["on_stop"]}],
        python={"rec": sync_hook, "bad": failing},
    )
    hooks.dispatch("on_stop", vm())
    await hooks.drain()
    assert seen == ["sync:on_stop:web"]
    outcome = {e.data["hook"]: e.data["ok"] for e in results(bus)}
    assert outcome == {"python:bad": False, "python:rec": True}


async def test_a_vetoing_pre_start_hook_refuses_and_a_plain_one_only_records(bus):
    veto = service(
        bus,
        [
            {"kind": "exec", "argv": ["/bin/false"], "events": ["pre_start"], "name": "advisory"},
            {
                "kind": "exec",
                "argv": [sys.executable, "-c", "import sys; sys.exit(7)"],
                "events": ["pre_start"],
                "veto": True,
                "name": "gate",
                "vms": ["web"],
            },
        ],
    )
    with pytest.raises(StartVeto, match="hook gate refused: exit code 7"):
        await veto.before_start(vm("web"))
    await veto.before_start(vm("db"))  # the veto hook is only for "web"; advisory just records
    outcome = [(e.data["hook"], e.data["ok"]) for e in results(bus)]
    assert outcome == [("advisory", False), ("gate", False), ("advisory", False)]


async def test_an_entry_point_can_veto_by_raising_start_veto(bus):
    def guard(event: str, payload: dict) -> None:
        if event == "pre_start":
            raise StartVeto("maintenance window")

    hooks = service(bus, [], python={"guard": guard})
    with pytest.raises(StartVeto, match="maintenance window"):
        await hooks.before_start(vm())


async def test_events_map_to_hook_events(bus):
    events, vms = bus
    called: list[str] = []
    hooks = service(bus, [], python={"rec": lambda event, payload: called.append(event)})
    events.add_listener(hooks.on_event)
    the_vm = vm()
    vms.insert(the_vm)
    events.publish("vm.state", "x", the_vm.id, from_state="starting", to_state="running")
    events.publish("vm.health", "x", the_vm.id, from_health="unknown", to_health="healthy")
    events.publish("vm.auto_restart", "x", the_vm.id, attempt=1)
    events.publish("hook.result", "x", the_vm.id)  # never a loop
    await hooks.drain()
    assert sorted(called) == sorted(
        ["on_state_change", "on_start", "on_health_change", "on_restart"]
    )
