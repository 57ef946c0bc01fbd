"""Lifecycle hooks with a real agent and a real guest: exec, webhook, entry-point callables."""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from stoker.client import StokerError
from tests.helpers import AgentProcess, free_port, guest_spec, short_tmpdir, wait_for

pytestmark = pytest.mark.integration

RECORD_EXEC = """
import json, os, sys
payload = sys.stdin.read()
env = {k: v for k, v in os.environ.items() if k.startswith("STOKER_") and k != "STOKER_PAYLOAD"}
with open(sys.argv[1], "a") as out:
    out.write(json.dumps({"env": env, "stdin": json.loads(payload)}) + "\\n")
"""

HOOK_MODULE = """
import json, os

def record(event, payload):
    with open(os.environ["STOKER_TEST_HOOK_FILE"], "a") as out:
        out.write(json.dumps({"event": event, "payload": payload}) + "\\n")
"""


def lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class _Receiver(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def webhook():
    _Receiver.received = []
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", _Receiver.received
    server.shutdown()


def python_hook_dir(root: Path) -> Path:
    """A tiny installed distribution that registers a callable in 'stoker.hooks'."""
    site = root / "site"
    dist = site / "stoker_test_hook-0.1.dist-info"
    dist.mkdir(parents=True)
    (site / "stoker_test_hook.py").write_text(HOOK_MODULE)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: stoker-test-hook\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[stoker.hooks]\nrecorder = stoker_test_hook:record\n")
    return site


def test_hooks_get_env_and_payload_and_a_veto_stops_a_start(guest, webhook):
    url, received = webhook
    work = short_tmpdir("stk-hooks-")
    exec_log, py_log = work / "exec.jsonl", work / "python.jsonl"
    config = work / "agent.toml"
    config.write_text(
        f"""
[hooks]
timeout_s = 10

[[hooks.hook]]
name = "recorder"
kind = "exec"
events = ["on_start", "on_stop", "on_state_change"]
argv = [{json.dumps(sys.executable)}, "-c", {json.dumps(RECORD_EXEC)}, "{exec_log}"]

[[hooks.hook]]
name = "notify"
kind = "webhook"
events = ["on_start"]
url = "{url}"
timeout_s = 2

[[hooks.hook]]
name = "broken"
kind = "exec"
events = ["on_start"]
argv = ["/bin/false"]

[[hooks.hook]]
name = "gatekeeper"
kind = "exec"
events = ["pre_start"]
argv = [{json.dumps(sys.executable)}, "-c", "import sys; print('not today'); sys.exit(3)"]
veto = true
labels = {{ veto = "yes" }}
"""
    )
    env = {
        "STOKER_CONFIG": str(config),
        "PYTHONPATH": str(python_hook_dir(work)),
        "STOKER_TEST_HOOK_FILE": str(py_log),
    }
    proc = AgentProcess(env=env).start()
    try:
        with proc.client() as api:
            port = free_port()
            vm = api.create_vm(guest_spec("hooked", port, labels={"tier": "web"}))
            assert api.start_vm("hooked", wait=True, timeout_s=90).state == "running"
            api.stop_vm("hooked", graceful=False)

            # exec: the VM's details in the environment, the JSON payload on stdin
            wait_for(
                lambda: any(e["env"]["STOKER_EVENT"] == "on_stop" for e in lines(exec_log)), 20
            )
            started = next(e for e in lines(exec_log) if e["env"]["STOKER_EVENT"] == "on_start")
            env_seen = started["env"]
            assert env_seen["STOKER_VM_ID"] == vm.id
            assert env_seen["STOKER_VM_NAME"] == "hooked"
            assert env_seen["STOKER_STATE"] == "running"
            assert env_seen["STOKER_FROM_STATE"] == "starting"
            assert env_seen["STOKER_REASON"] == "guest ready"
            assert env_seen["STOKER_VM_ADDRESS"] == "127.0.0.1"
            assert env_seen["STOKER_VM_PORTS"] == f"80=127.0.0.1:{port}"
            assert started["stdin"]["event"] == "on_start"
            assert started["stdin"]["vm"]["labels"] == {"tier": "web"}
            changes = [
                e["stdin"]["state"]
                for e in lines(exec_log)
                if e["env"]["STOKER_EVENT"] == "on_state_change"
            ]
            assert {"starting", "running", "stopping", "stopped"} <= set(changes)

            # webhook: a JSON POST
            wait_for(lambda: received, 10)
            assert received[0]["event"] == "on_start"
            assert received[0]["vm"]["id"] == vm.id and received[0]["state"] == "running"

            # entry point callable: every event
            wait_for(lambda: any(e["event"] == "on_stop" for e in lines(py_log)), 10)
            assert any(
                e["event"] == "on_start" and e["payload"]["vm"]["name"] == "hooked"
                for e in lines(py_log)
            )

            # every result is an event; a failing hook is recorded and blocks nothing
            results = api.events(vm="hooked", type="hook.result", limit=1000)
            by_hook = {(e.data["hook"], e.data["hook_event"]): e.data for e in results}
            assert by_hook[("recorder", "on_start")]["ok"] is True
            assert by_hook[("recorder", "on_start")]["exit_code"] == 0
            assert by_hook[("notify", "on_start")]["status"] == 204
            assert by_hook[("broken", "on_start")]["ok"] is False
            assert by_hook[("broken", "on_start")]["exit_code"] == 1
            assert by_hook[("python:recorder", "on_start")]["ok"] is True

            # a vetoing pre-start hook stops the start; nothing boots
            api.create_vm(guest_spec("refused", labels={"veto": "yes"}))
            with pytest.raises(StokerError) as info:
                api.start_vm("refused", wait=True, timeout_s=30)
            assert info.value.status == 409
            assert "vetoed" in info.value.detail and "exit code 3" in info.value.detail
            refused = api.get_vm("refused")
            assert refused.state == "pending" and refused.process is None
            veto = api.events(vm="refused", type="hook.result")
            assert veto[-1].data["ok"] is False and veto[-1].data["exit_code"] == 3
            assert "not today" in veto[-1].data["output"]
    finally:
        proc.cleanup()
