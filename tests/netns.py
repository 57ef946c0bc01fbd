"""Throwaway network namespaces for tests: create, wire with veth pairs, always clean up.

Every namespace is named ``stknt-<pid>-<random>-<tag>`` so concurrent test runs never meet,
and leftovers of a crashed run (its pid is gone) are removed the next time. Removing a
namespace first kills every process still inside it (``ip netns pids``), then deletes it,
which takes its interfaces, veth peers and nft tables with it.

Traffic in tests goes only between namespaces made here: nothing routes to the outside.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from stoker.host.netns import NETNS_DIR, call_in_netns

PREFIX = "stknt-"


@dataclass(frozen=True)
class Netns:
    name: str

    def argv(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = 15) -> str:
        proc = subprocess.run(
            self.argv(*argv), capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} in {self.name} failed: {proc.stderr.strip()}")
        return proc.stdout

    def spawn(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        """A long-running process inside the namespace, in its own session, output to ``log``."""
        with open(log, "ab") as out:
            return subprocess.Popen(
                self.argv(*argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )

    def pids(self) -> list[int]:
        out = subprocess.run(
            ["ip", "netns", "pids", self.name], capture_output=True, text=True, check=False
        ).stdout
        return [int(p) for p in out.split()]

    def http_get(self, url: str, timeout: float = 5) -> tuple[int, str] | None:
        """GET from inside the namespace (the socket is made on a thread that joined it)."""

        def get() -> tuple[int, str] | None:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as answer:
                    return int(answer.status), answer.read().decode()
            except Exception:
                return None

        return call_in_netns(self.name, get)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove(ns: Netns) -> None:
    """Kill what runs inside, then delete the namespace (idempotent)."""
    for _ in range(50):
        pids = ns.pids()
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    subprocess.run(["ip", "netns", "delete", ns.name], capture_output=True, check=False)


def remove_stale() -> None:
    """Namespaces left by test runs whose process is gone."""
    if not NETNS_DIR.is_dir():
        return
    for entry in NETNS_DIR.iterdir():
        parts = entry.name.split("-")
        ours = entry.name.startswith(PREFIX) and len(parts) > 2 and parts[1].isdigit()
        if ours and not _pid_alive(int(parts[1])):
            remove(Netns(entry.name))


def create(tag: str) -> Netns:
    ns = Netns(f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}-{tag}")
    subprocess.run(["ip", "netns", "add", ns.name], check=True, capture_output=True)
    ns.run("ip", "link", "set", "lo", "up")
    return ns


@contextlib.contextmanager
def namespaces(*tags: str) -> Iterator[list[Netns]]:
    """One fresh namespace per tag; all removed afterwards, whatever happened."""
    remove_stale()
    made: list[Netns] = []
    try:
        for tag in tags:
            made.append(create(tag))
        yield made
    finally:
        for ns in made:
            remove(ns)


def veth(
    a: Netns, a_name: str, a_cidr: str | None, b: Netns, b_name: str, b_cidr: str | None
) -> None:
    """A veth pair from ``a`` to ``b``, addressed and up (created inside the namespaces,
    so names never clash with the host's)."""
    tmp_a, tmp_b = f"stv{secrets.token_hex(4)}", f"stv{secrets.token_hex(4)}"
    subprocess.run(
        [
            "ip",
            "link",
            "add",
            tmp_a,
            "netns",
            a.name,
            "type",
            "veth",
            "peer",
            "name",
            tmp_b,
            "netns",
            b.name,
        ],
        check=True,
        capture_output=True,
    )
    for ns, tmp, name, cidr in ((a, tmp_a, a_name, a_cidr), (b, tmp_b, b_name, b_cidr)):
        ns.run("ip", "link", "set", tmp, "name", name)
        if cidr:
            ns.run("ip", "addr", "add", cidr, "dev", name)
        ns.run("ip", "link", "set", name, "up")
