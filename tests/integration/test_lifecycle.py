"""The foundation, end to end: a real agent process driving real QEMU guests (TCG)."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from stoker.client import StokerError
from tests.helpers import AgentProcess, free_port, guest_spec, http_get, pid_alive, wait_for

pytestmark = pytest.mark.integration


def start_guest(api, name: str, **overrides):
    port = free_port()
    vm = api.create_vm(guest_spec(name, port, **overrides))
    assert vm.state == "pending"
    vm = api.start_vm(name, wait=True, timeout_s=90)
    return vm, port


def test_create_start_running_with_guest_http(agent):
    with agent.client() as api:
        vm, port = start_guest(api, "web")
        assert vm.state == "running", vm
        assert vm.state_reason == "guest ready"
        assert wait_for(lambda: http_get(f"http://127.0.0.1:{port}/health"), 10) == (200, "ok\n")
        shown = api.get_vm(vm.id)
        states = [t.to_state for t in shown.transitions]
        assert states[:3] == ["running", "starting", "pending"]
        # times on the wire are UTC with a Z (the raw JSON: the model has parsed them)
        raw = api.request("GET", f"/api/v1/vms/{vm.id}")
        assert all(t["at"].endswith("Z") for t in raw["transitions"])
        assert shown.process.accel == "tcg"
        health = api.vm_health("web")
        assert health.vmm.process_alive and health.vmm.control_socket == "answering"
        assert "STOKER-GUEST-READY" in api.console("web").text


def test_graceful_stop_goes_through_acpi(agent):
    with agent.client() as api:
        vm, _ = start_guest(api, "graceful")
        pid = vm.process.pid
        began = time.monotonic()
        stopped = api.stop_vm("graceful", graceful=True, timeout_s=20)
        took = time.monotonic() - began
        assert stopped.state == "stopped"
        assert stopped.state_reason == "guest shut down gracefully"
        assert took < 10, "ACPI power-down should end the VMM well before the timeout"
        assert not pid_alive(pid)
        assert stopped.process is None


def test_forced_stop_kills_at_once(agent):
    with agent.client() as api:
        vm, _ = start_guest(api, "forced")
        pid = vm.process.pid
        stopped = api.stop_vm("forced", graceful=False)
        assert stopped.state == "stopped"
        assert stopped.state_reason == "forced stop: VMM killed"
        assert not pid_alive(pid)


def test_restart_gives_a_new_vmm_and_the_guest_answers(agent):
    with agent.client() as api:
        vm, port = start_guest(api, "again")
        old_pid = vm.process.pid
        vm = api.restart_vm("again", graceful=False, wait=True)
        assert vm.state == "running" and vm.state_reason == "restarted"
        assert vm.process.pid != old_pid
        assert not pid_alive(old_pid)
        assert wait_for(lambda: http_get(f"http://127.0.0.1:{port}/health"), 10)
        states = [t.to_state for t in api.get_vm("again").transitions]
        assert states[:2] == ["running", "restarting"]
        # restart of a stopped VM starts it
        api.stop_vm("again", graceful=False)
        assert api.restart_vm("again", wait=True).state == "running"


def test_illegal_action_answers_409_with_state_and_allowed_actions(agent):
    with agent.client() as api:
        start_guest(api, "busy")
        with pytest.raises(StokerError) as info:
            api.start_vm("busy")
        assert info.value.status == 409
        assert info.value.body["current_state"] == "running"
        assert info.value.body["allowed_actions"] == ["stop", "restart"]
        with pytest.raises(StokerError) as info:
            api.delete_vm("busy")
        assert info.value.status == 409 and "running" in info.value.detail
        api.delete_vm("busy", force=True)


def test_agent_sigkill_leaves_vm_running_and_new_agent_adopts_it(agent):
    with agent.client() as api:
        vm, port = start_guest(api, "survivor")
    pid = vm.process.pid
    agent.signal(signal.SIGKILL)
    time.sleep(0.5)
    assert pid_alive(pid), "killing the agent must not kill the VM"
    assert http_get(f"http://127.0.0.1:{port}/health")
    agent.start()
    with agent.client() as api:
        vm = api.get_vm("survivor")
        assert vm.state == "running" and vm.process.pid == pid
        assert api.vm_health("survivor").vmm.control_socket == "answering"
        stopped = api.stop_vm("survivor", graceful=True, timeout_s=20)
        assert stopped.state == "stopped"
        assert stopped.state_reason == "guest shut down gracefully"
    assert wait_for(lambda: not pid_alive(pid), 5)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_agent_stop_signals_never_stop_vms(agent, sig):
    with agent.client() as api:
        vm, _ = start_guest(api, "steady")
    agent.signal(sig)
    time.sleep(0.3)
    assert pid_alive(vm.process.pid)
    agent.start()
    with agent.client() as api:
        assert api.get_vm("steady").state == "running"


def test_vmm_killed_while_agent_down_is_marked_error(agent):
    with agent.client() as api:
        vm, _ = start_guest(api, "lost")
    agent.signal(signal.SIGKILL)
    os.kill(vm.process.pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(vm.process.pid), 5)
    agent.start()
    with agent.client() as api:
        vm = api.get_vm("lost")
        assert vm.state == "error"
        assert vm.state_reason == "VMM exited while the agent was down"
        # cleanup error -> stopped, then it can start again
        assert api.stop_vm("lost").state == "stopped"


def test_delete_removes_the_vms_files(agent):
    with agent.client() as api:
        vm, _ = start_guest(api, "doomed")
        vm_dir = agent.data_dir / "vms" / vm.id
        assert (vm_dir / "console.log").exists()
        api.stop_vm("doomed", graceful=False)
        api.delete_vm("doomed")
        assert not vm_dir.exists()
        with pytest.raises(StokerError) as info:
            api.get_vm("doomed")
        assert info.value.status == 404


def test_boot_timeout_goes_to_error(agent):
    with agent.client() as api:
        api.create_vm(guest_spec("mute", ready_marker="NEVER-PRINTED", boot_timeout_s=4))
        vm = api.start_vm("mute", wait=True, timeout_s=30)
        assert vm.state == "error"
        assert "boot timeout" in vm.state_reason and "4 s" in vm.state_reason
        assert vm.process is None


def test_vmm_dying_during_boot_is_an_error(agent, guest):
    with agent.client() as api:
        api.create_vm(guest_spec("crash", cmdline=guest.cmdline + " stoker.fail=1"))
        vm = api.start_vm("crash", wait=True, timeout_s=60)
        assert vm.state == "error"
        assert "during boot" in vm.state_reason


def listing(path):
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"name": "Bad_Name"}, 422, "name"),
        ({"name": "../etc"}, 422, "name"),
        ({"name": "neg", "memory_mib": -5}, 422, "memory_mib"),
        ({"name": "nokernel", "kernel": "/nonexistent/vmlinuz"}, 422, "kernel"),
        ({"name": "extra", "memroy_mib": 5}, 422, "memroy_mib"),
    ],
)
def test_bad_input_gets_4xx_and_leaves_nothing(agent, body, status, field):
    before = listing(agent.data_dir / "vms")
    spec = {**guest_spec("x"), **body}
    with agent.client() as api, pytest.raises(StokerError) as info:
        api.create_vm(spec)
    assert info.value.status == status
    assert info.value.body["type"] == "about:blank"
    assert any(e["field"] == field for e in info.value.body["errors"]), info.value.body
    assert listing(agent.data_dir / "vms") == before
    with agent.client() as api:
        assert api.list_vms() == []


def test_malformed_json_is_400_problem(agent):
    transport = httpx.HTTPTransport(uds=str(agent.socket))
    with httpx.Client(transport=transport, base_url="http://stoker") as http:
        answer = http.post(
            "/api/v1/vms", content=b'{"name": "x",', headers={"content-type": "application/json"}
        )
    assert answer.status_code == 400
    assert answer.headers["content-type"] == "application/problem+json"
    assert "not valid JSON" in answer.json()["detail"]


def test_unix_socket_mode_is_0660(agent):
    assert (agent.socket.stat().st_mode & 0o777) == 0o660


def test_tcp_listener_requires_the_token(guest):
    port = free_port()
    proc = AgentProcess(
        env={"STOKER_API__TCP_PORT": str(port), "STOKER_API__TOKEN": "s3cret" * 6}
    ).start()
    try:
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/api/v1/vms").status_code == 401
        wrong = httpx.get(f"{url}/api/v1/vms", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        right = httpx.get(f"{url}/api/v1/vms", headers={"Authorization": f"Bearer {'s3cret' * 6}"})
        assert right.status_code == 200 and right.json() == []
        with proc.client() as api:  # the Unix socket needs no token
            assert api.list_vms() == []
    finally:
        proc.cleanup()


def test_list_filters_by_state_and_label(agent):
    with agent.client() as api:
        api.create_vm(guest_spec("a1", labels={"tier": "web"}))
        api.create_vm(guest_spec("a2", labels={"tier": "db"}))
        assert [v.name for v in api.list_vms(labels=["tier=web"])] == ["a1"]
        assert [v.name for v in api.list_vms(state="pending")] == ["a1", "a2"]
        assert api.list_vms(state="running") == []
