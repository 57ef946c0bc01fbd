"""Shared by the integration tests and the benchmarks: a real agent process and a real guest."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from stoker.client import Client, StokerError
from stoker.guest.build import GuestImage, build_guest, find_guest

REPO = Path(__file__).resolve().parents[1]


def guest_image() -> GuestImage:
    """The test guest, built on first use (``make test`` builds it beforehand)."""
    return find_guest() or build_guest(log=lambda _m: None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def short_tmpdir(prefix: str = "stk-") -> Path:
    """Unix socket paths must stay under 108 bytes: keep data dirs short."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def guest_spec(name: str, port: int | None = None, **overrides: Any) -> dict[str, Any]:
    image = guest_image()
    spec: dict[str, Any] = {
        "name": name,
        "kernel": str(image.kernel),
        "initrd": str(image.initrd),
        "cmdline": image.cmdline,
        "ready_marker": image.ready_marker,
        "memory_mib": 128,
        "accel": "tcg",
        "boot_timeout_s": 60,
        "stop_timeout_s": 10,
    }
    if port is not None:
        spec["network"] = {"mode": "user", "port_forwards": [{"host_port": port, "guest_port": 80}]}
    else:
        # explicit: a spec without a network joins the agent's default managed network
        spec["network"] = {"mode": "none"}
    spec.update(overrides)
    return spec


def http_get(url: str, timeout: float = 0.25) -> tuple[int, str] | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return answer.status, answer.read().decode()
    except Exception:
        return None


def wait_for(check: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie (signal 0 says yes to zombies)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


class AgentProcess:
    """``stoker agent`` as a real process with its own data directory and socket."""

    def __init__(
        self,
        data_dir: Path | None = None,
        env: dict[str, str] | None = None,
        wrapper: Sequence[str] = (),
        module: str | None = None,
    ) -> None:
        self.data_dir = data_dir or short_tmpdir()
        self.socket = self.data_dir / "stoker.sock"
        self.env = env or {}
        #: run the agent under this command, e.g. ``ip netns exec NS``
        self.wrapper = list(wrapper)
        #: run ``python -m MODULE`` instead of ``stoker agent``: a test-only agent from
        #: ``tests.agents`` (e.g. ``tests.agents.slow_save``) that wraps a driver
        self.module = module
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.data_dir / "agent.log"

    def start(self, timeout: float = 20.0) -> AgentProcess:
        env = {
            **os.environ,
            "STOKER_DATA_DIR": str(self.data_dir),
            # bridges, NAT rules and dnsmasq only inside a namespace the test made, never in
            # the host's own: an agent run outside one (``ip netns exec``, ``nsenter
            # --net=/run/netns/...``) makes no networks
            "STOKER_NETWORK__ENABLED": "true" if "netns" in " ".join(self.wrapper) else "false",
            **self.env,
        }
        env.pop("STOKER_SOCKET", None)
        command = ["-m", "stoker.cli.main", "agent"]
        if self.module is not None:
            command = ["-m", self.module]
            # the module lives in this repository's tests package, wherever pytest runs from
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.wrapper, sys.executable, *command],
                env=env,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited early:\n{self.log.read_text()}")
            with contextlib.suppress(StokerError), self.client() as api:
                api.version()
                return self
            time.sleep(0.05)
        raise RuntimeError(f"agent did not answer within {timeout} s:\n{self.log.read_text()}")

    def client(self) -> Client:
        return Client(socket=self.socket)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=20)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGTERM)

    def cleanup(self) -> None:
        """Stop the agent and kill every VMM it left behind (tests must not leak QEMUs)."""
        self.stop()
        vms_dir = self.data_dir / "vms"
        # a VMM carries its VM's id in its command line (process=stoker-<id>), the VM's
        # directory path when it runs unconfined
        markers = [str(vms_dir).encode()]
        vm_ids = [d.name for d in vms_dir.iterdir()] if vms_dir.is_dir() else []
        markers += [f"process=stoker-{vm_id}".encode() for vm_id in vm_ids]
        for proc_dir in Path("/proc").iterdir():
            if not proc_dir.name.isdigit():
                continue
            try:
                cmdline = (proc_dir / "cmdline").read_bytes()
            except OSError:
                continue
            if any(marker in cmdline for marker in markers):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(proc_dir.name), signal.SIGKILL)
        self._remove_cgroups(vm_ids)
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def _remove_cgroups(self, vm_ids: list[str]) -> None:
        """The per-VM cgroups of VMMs killed here (the agent removes them only when it sees
        a VM stop); a VMM just killed may need a moment to leave its cgroup."""
        parent = self.env.get("STOKER_QUOTAS__CGROUP_PARENT", "stoker")
        root = Path("/sys/fs/cgroup")
        hierarchies = [root, *(d for d in root.iterdir() if d.is_dir())] if root.is_dir() else []
        leftovers = [h / parent / vm_id for h in hierarchies for vm_id in vm_ids]
        deadline = time.monotonic() + 2.0
        while leftovers and time.monotonic() < deadline:
            for path in list(leftovers):
                try:
                    path.rmdir()
                except FileNotFoundError:
                    pass
                except OSError:
                    continue  # busy: its VMM is still exiting
                leftovers.remove(path)
            if leftovers:
                time.sleep(0.02)

    @property
    def images(self) -> Path:
        """The agent's own image pool (``<data_dir>/images``): where tests put disk images."""
        path = self.data_dir / "images"
        path.mkdir(exist_ok=True)
        return path

    def logs(self) -> str:
        return self.log.read_text() if self.log.exists() else ""
