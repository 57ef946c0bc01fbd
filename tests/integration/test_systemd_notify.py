"""The notify protocol with a real agent process, against a datagram socket this test binds
where systemd's would be (PID 1 here is not systemd).

READY=1 only once re-adopted VMs run and the API answers; WATCHDOG=1 keeps coming from the
event loop; STOPPING=1 on SIGTERM. Logs are JSON lines on stdout, as the journal wants them.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stoker.client import Client
from tests.helpers import AgentProcess, guest_spec, short_tmpdir

pytestmark = pytest.mark.integration


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, Path]]:
    where = short_tmpdir("stk-sd-")
    path = where / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    try:
        yield sock, path
    finally:
        sock.close()
        path.unlink(missing_ok=True)
        where.rmdir()


def _messages(sock: socket.socket, until: str, timeout: float) -> list[dict[str, str]]:
    """Datagrams (as KEY=VALUE fields) up to and including the first holding ``until``."""
    got: list[dict[str, str]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(4096).decode()
        except TimeoutError:
            break
        fields = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
        got.append(fields)
        if until in data:
            return got
    raise AssertionError(f"no {until!r} within {timeout} s; got {got}")


def test_ready_after_readoption_then_watchdog_then_stopping(notify_socket, guest) -> None:
    sock, path = notify_socket
    first = AgentProcess().start()
    second = None
    try:
        with first.client() as api:
            api.create_vm(guest_spec("kept"))
            process = api.start_vm("kept", wait=True, timeout_s=90).process
        assert process is not None
        first.stop()  # lets go of the VM, which keeps running
        env = {
            "NOTIFY_SOCKET": str(path),
            "WATCHDOG_USEC": "600000",  # 0.6 s: a ping every 0.3 s
            "INVOCATION_ID": "0123456789abcdef0123456789abcdef",
        }
        second = AgentProcess(data_dir=first.data_dir, env=env)
        second.start()  # returns once the API answers; READY=1 may already be queued
        ready = _messages(sock, "READY=1", timeout=20)[-1]
        assert second.proc is not None and ready["MAINPID"] == str(second.proc.pid)
        with Client(socket=second.socket) as api:
            vm = api.get_vm("kept")  # re-adopted before READY=1: running, same VMM
            assert vm.state == "running" and vm.process and vm.process.pid == process.pid
            adopted = api.events(vm="kept", type="vm.adopted")
            assert adopted, "READY=1 came before the VM was re-adopted"
        pings = _messages(sock, "WATCHDOG=1", timeout=2) + _messages(sock, "WATCHDOG=1", 2)
        assert sum("WATCHDOG" in m for m in pings) >= 2
        second.stop()
        assert _messages(sock, "STOPPING=1", timeout=10)
        # the journal's format: every line of the agent's stdout is one JSON object
        records = [json.loads(line) for line in second.logs().splitlines() if line.startswith("{")]
        assert any(r.get("message") == "agent ready" for r in records)
    finally:
        if second is not None:
            second.stop()
        first.cleanup()
