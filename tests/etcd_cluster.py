"""A real etcd cluster on loopback for tests and benchmarks: Debian's ``etcd`` 3.4 binary,
one process per member, free ports, temp data dirs, always cleaned up.

It talks to etcd only over plain HTTP (``/health`` and the JSON gateway's status call) so that
it is an independent witness of the cluster, not a second user of the code under test.

With ``netns``, every member runs inside that network namespace (``nsenter --net``) and
listens on ``host`` there (an address of a bridge the test made), and the harness's own HTTP
calls are made from inside it too; agents in other namespaces reach it over veth pairs.

    with EtcdCluster(size=3) as cluster:
        urls = cluster.client_urls
        leader = cluster.leader()
        cluster.kill(leader)
        ...
        cluster.restart(leader)
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import functools
import json
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from stoker.host.netns import call_in_netns
from tests.helpers import free_port, short_tmpdir

T = TypeVar("T")

_PR_SET_PDEATHSIG = 1
ETCD = shutil.which("etcd") or "/usr/bin/etcd"
#: Why a test skips when the binary is missing (``make test`` installs ``etcd-server``).
MISSING = "needs Debian's etcd-server 3.4 (`apt-get install etcd-server`): /usr/bin/etcd not found"


def _die_with_parent() -> None:
    """Runs in the child before exec: if the test process is killed outright (no finally),
    the kernel kills the etcd member too instead of leaving it on its ports."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def etcd_available() -> bool:
    return Path(ETCD).exists()


@dataclass
class Member:
    """One etcd process: its name, ports, data dir and (while it runs) its process."""

    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    host: str = "127.0.0.1"

    @property
    def client_url(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class EtcdCluster:
    """``size`` etcd members on 127.0.0.1 with short raft timers, so leader changes take
    well under a second (the defaults, 100 ms heartbeat and 1 s election, would slow every
    failover test by a second)."""

    def __init__(
        self,
        size: int = 3,
        heartbeat_ms: int = 50,
        election_ms: int = 500,
        start_timeout: float = 20.0,
        host: str = "127.0.0.1",
        netns: str | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("an etcd cluster needs at least one member")
        self.netns = netns
        self.root = short_tmpdir("stk-etcd-")
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self.start_timeout = start_timeout
        self.token = f"stoker-test-{self.root.name}"
        self.members = [
            Member(
                name=f"m{i}",
                client_port=free_port(),
                peer_port=free_port(),
                data_dir=self.root / f"m{i}",
                log=self.root / f"m{i}.log",
                host=host,
            )
            for i in range(size)
        ]

    # -- life cycle ---------------------------------------------------------------------------

    def __enter__(self) -> EtcdCluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> EtcdCluster:
        for member in self.members:
            self._spawn(member)
        self.wait_healthy()
        return self

    def close(self) -> None:
        """Kill every member and remove the data dirs; safe to call twice."""
        for member in self.members:
            self._kill(member)
        shutil.rmtree(self.root, ignore_errors=True)

    def _spawn(self, member: Member) -> None:
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        cmd = [
            ETCD,
            "--name", member.name,
            "--data-dir", str(member.data_dir),
            "--listen-client-urls", member.client_url,
            "--advertise-client-urls", member.client_url,
            "--listen-peer-urls", member.peer_url,
            "--initial-advertise-peer-urls", member.peer_url,
            "--initial-cluster", initial,
            "--initial-cluster-token", self.token,
            "--initial-cluster-state", "new",
            "--heartbeat-interval", str(self.heartbeat_ms),
            "--election-timeout", str(self.election_ms),
            "--logger", "zap",
            "--log-outputs", "stderr",
        ]  # fmt: skip
        if self.netns is not None:
            cmd = ["nsenter", f"--net=/run/netns/{self.netns}", *cmd]
        with open(member.log, "ab") as log:
            member.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    @staticmethod
    def _kill(member: Member) -> None:
        if member.proc is None:
            return
        if member.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                member.proc.send_signal(signal.SIGKILL)
            member.proc.wait(timeout=10)
        member.proc = None

    # -- what tests use -----------------------------------------------------------------------

    @property
    def client_urls(self) -> list[str]:
        return [m.client_url for m in self.members]

    def member(self, name: str) -> Member:
        for m in self.members:
            if m.name == name:
                return m
        raise KeyError(f"no member {name!r}; members are {[m.name for m in self.members]}")

    def kill(self, name: str) -> None:
        """SIGKILL one member (a crash, not a clean leave): its data dir stays for restart."""
        self._kill(self.member(name))

    def pause(self, name: str) -> None:
        """SIGSTOP one member: it keeps its sockets but answers nothing, like a partition."""
        proc = self.member(name).proc
        if proc is None:
            raise RuntimeError(f"member {name} is not running")
        proc.send_signal(signal.SIGSTOP)

    def resume(self, name: str) -> None:
        proc = self.member(name).proc
        if proc is None:
            raise RuntimeError(f"member {name} is not running")
        proc.send_signal(signal.SIGCONT)

    def restart(self, name: str, timeout: float = 20.0) -> None:
        """Start a killed member again from its data dir and wait until it is healthy."""
        member = self.member(name)
        if member.running:
            raise RuntimeError(f"member {name} is still running")
        self._spawn(member)
        self._wait(
            lambda: self._here(lambda: self._healthy(member)), timeout, f"member {name} healthy"
        )

    def _here(self, fn: Callable[[], T]) -> T:
        """``fn()`` from inside the members' namespace (or here, on loopback)."""
        return call_in_netns(self.netns, fn)

    def restart_all(self, timeout: float = 30.0) -> None:
        """Start every killed member again at once (one alone has no quorum to be healthy)."""
        for member in self.members:
            if not member.running:
                self._spawn(member)
        self.wait_healthy(timeout)

    def kill_all(self) -> None:
        for member in self.members:
            self._kill(member)

    def healthy(self) -> bool:
        running = [m for m in self.members if m.running]
        return bool(running) and all(
            self._here(functools.partial(self._healthy, m)) for m in running
        )

    def wait_healthy(self, timeout: float | None = None) -> None:
        self._wait(self.healthy, timeout or self.start_timeout, "every member healthy")

    def leader(self, timeout: float = 10.0) -> str:
        """The name of the current raft leader, as the running members report it."""
        found: list[str] = []

        def agreed() -> bool:
            ids = {
                m.name: self._here(functools.partial(self._status, m))
                for m in self.members
                if m.running
            }
            known = {st["header"]["member_id"]: name for name, st in ids.items() if st}
            leaders = {st["leader"] for st in ids.values() if st}
            if len(leaders) == 1 and (leader := leaders.pop()) in known:
                found.append(known[leader])
                return True
            return False

        self._wait(agreed, timeout, "the members to agree on a leader")
        return found[-1]

    def followers(self) -> list[str]:
        leader = self.leader()
        return [m.name for m in self.members if m.running and m.name != leader]

    def move_leader(self, name: str, timeout: float = 10.0) -> None:
        """Hand raft leadership to member ``name`` (etcd's MoveLeader, asked of the leader)."""
        target = self._here(lambda: self._status(self.member(name)))
        if target is None:
            raise RuntimeError(f"member {name} does not answer")
        if self.leader() == name:
            return
        leader = self.member(self.leader())
        self._here(
            lambda: self._post(
                leader,
                "/v3/maintenance/transfer-leadership",
                {"targetID": target["header"]["member_id"]},
            )
        )
        self._wait(lambda: self.leader() == name, timeout, f"{name} to lead")

    def compact(self, revision: int) -> None:
        """Drop the history before ``revision`` (what etcd's auto-compaction does)."""
        running = next(m for m in self.members if m.running)
        self._here(
            lambda: self._post(
                running, "/v3/kv/compaction", {"revision": str(revision), "physical": True}
            )
        )

    def get(self, key: str) -> dict[str, Any] | None:
        """One key as a running member has it (the JSON gateway; values base64), or None."""
        body: dict[str, object] = {"key": base64.b64encode(key.encode()).decode()}
        for member in self.members:
            if not member.running:
                continue
            try:
                answer = self._here(functools.partial(self._post, member, "/v3/kv/range", body))
            except (OSError, ValueError, urllib.error.URLError):
                continue
            kvs = answer.get("kvs") if isinstance(answer, dict) else None
            return dict(kvs[0]) if kvs else None
        raise RuntimeError("no etcd member answered")

    def watchers(self, name: str) -> int:
        """How many watches member ``name`` serves now (its own metric), to find the member
        that a client's watch stream landed on."""
        with urllib.request.urlopen(self.member(name).client_url + "/metrics", timeout=2) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("etcd_debugging_mvcc_watcher_total "):
                    return int(float(line.split()[1]))
        return 0

    def logs(self) -> str:
        return "\n".join(
            f"--- {m.name} ---\n{m.log.read_text(errors='replace')[-4000:]}"
            for m in self.members
            if m.log.exists()
        )

    # -- plumbing -----------------------------------------------------------------------------

    @staticmethod
    def _healthy(member: Member) -> bool:
        if not member.running:
            return False
        try:
            with urllib.request.urlopen(member.client_url + "/health", timeout=0.5) as answer:
                return bool(json.loads(answer.read()).get("health") == "true")
        except (OSError, ValueError, urllib.error.URLError):
            return False

    @staticmethod
    def _status(member: Member) -> dict[str, Any] | None:
        """The member's own status (its id and the leader it follows) over the JSON gateway."""
        request = urllib.request.Request(
            member.client_url + "/v3/maintenance/status",
            data=b"{}",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=0.5) as answer:
                status = json.loads(answer.read())
        except (OSError, ValueError, urllib.error.URLError):
            return None
        return status if isinstance(status, dict) and status.get("leader") else None

    @staticmethod
    def _post(member: Member, path: str, body: dict[str, object]) -> object:
        request = urllib.request.Request(
            member.client_url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as answer:
            return json.loads(answer.read())

    def _wait(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd: waited {timeout} s for {what}\n{self.logs()}")
            time.sleep(0.05)
