"""A three-node stoker cluster on one machine, for the cluster tests and ``bench.cluster``.

Everything is made here and removed afterwards, whatever happens:

    hub namespace: bridge stkcbr0 10.247.18.1/24, the three etcd members on it
      ├─ veth ── n1 namespace: eth0 10.247.18.11, agent n1, its QEMUs
      ├─ veth ── n2 namespace: eth0 10.247.18.12, agent n2, its QEMUs
      └─ veth ── n3 namespace: eth0 10.247.18.13, agent n3, its QEMUs

A node is partitioned by setting its eth0 down; killed by SIGKILLing every process in its
namespace (agent, fence guard, VMMs). Guests use user-mode networking with a port forward on
their node's own loopback, so a VM answers on ``127.0.0.1:PORT`` inside whichever namespace
runs it. The ``Monitor`` scans every namespace's QEMUs five times a second and records any VM
it sees running twice.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from stoker.client import Client, StokerError
from stoker.host.proc import read_cmdline
from tests import netns as tn
from tests.etcd_cluster import EtcdCluster
from tests.helpers import AgentProcess, wait_for

SUBNET = "10.247.18"
HUB = f"{SUBNET}.1"
NAMES = ("n1", "n2", "n3")
LABELS = {"n1": "zone=a", "n2": "zone=a", "n3": "zone=b"}


@dataclass
class Node:
    name: str
    ns: tn.Netns
    agent: AgentProcess
    env: dict[str, str]

    def api(self) -> Client:
        return self.agent.client()

    def answers(self, port: int) -> bool:
        """The guest forwarded to ``port`` answers its health page, inside this node."""
        url = f"http://127.0.0.1:{port}/health"
        return self.ns.http_get(url, timeout=0.25) is not None

    def kill_everything(self) -> None:
        """Node death: SIGKILL every process in the namespace (agent, guard, VMMs)."""
        for _ in range(20):
            pids = self.ns.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)
        if self.agent.proc is not None:
            self.agent.proc.wait(timeout=10)

    def kill_agent(self) -> None:
        """Only the agent dies (its VMMs and fence guard live on)."""
        assert self.agent.proc is not None
        self.agent.proc.kill()
        self.agent.proc.wait(timeout=10)

    def start_agent(self) -> None:
        """A new agent process on the same data directory (the node coming back)."""
        self.agent = AgentProcess(
            data_dir=self.agent.data_dir, wrapper=self.agent.wrapper, env=self.env
        ).start()

    def link(self, up: bool) -> None:
        self.ns.run("ip", "link", "set", "eth0", "up" if up else "down")


def running_vms(nodes: dict[str, Node]) -> dict[str, list[tuple[str, int]]]:
    """VM name -> [(node, pid)] of every live QEMU process in the nodes' namespaces (one scan
    of /proc, each process's network namespace compared by inode)."""
    inodes = {os.stat(f"/run/netns/{n.ns.name}").st_ino: name for name, n in nodes.items()}
    found: dict[str, list[tuple[str, int]]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            link = os.readlink(entry / "ns" / "net")
        except OSError:
            continue
        node = inodes.get(int(link[5:-1])) if link.startswith("net:[") else None
        if node is None or not _is_qemu(entry):
            continue
        for arg in read_cmdline(int(entry.name)):
            if arg.startswith("guest=stoker-"):
                vm = arg.split(",", 1)[0].removeprefix("guest=stoker-")
                found.setdefault(vm, []).append((node, int(entry.name)))
    return found


def _is_qemu(proc: Path) -> bool:
    """The process runs QEMU (not, say, the jail script whose arguments carry QEMU's)."""
    try:
        return os.path.basename(os.readlink(proc / "exe")).startswith("qemu-system")
    except OSError:
        return False


@dataclass
class Monitor:
    nodes: dict[str, Node]
    violations: list[str] = field(default_factory=list)
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for vm, where in running_vms(self.nodes).items():
                if len(where) > 1:
                    self.violations.append(f"{time.strftime('%X')} {vm} runs as {where}")
            self.samples += 1


@dataclass
class World:
    hub: tn.Netns
    etcd: EtcdCluster
    nodes: dict[str, Node]
    monitor: Monitor
    ttl: int

    def api(self, node: str = "n1") -> Client:
        return self.nodes[node].api()

    def ready(self, names: tuple[str, ...] = NAMES) -> bool:
        """Every named node is alive and uncordoned, as the first one sees it."""
        try:
            nodes = {n.name: n.state for n in self.api(names[0]).cluster_nodes()}
        except StokerError:
            return False
        return all(nodes.get(name) == "ready" for name in names)


def _cleanup(node: Node) -> None:
    node.agent.cleanup()  # the node's current agent, whichever restart it is


def agent_env(name: str, etcd: EtcdCluster, ttl: int) -> dict[str, str]:
    return {
        "STOKER_CLUSTER__ENDPOINTS": ",".join(etcd.client_urls),
        "STOKER_CLUSTER__NODE_NAME": name,
        "STOKER_CLUSTER__LABELS": LABELS[name],
        "STOKER_CLUSTER__LEASE_TTL_S": str(ttl),
        "STOKER_CLUSTER__ADVERTISE_URL": f"http://{SUBNET}.{10 + int(name[1])}:8080",
        "STOKER_NETWORK__ENABLED": "false",  # guests use user-mode networking here
        "STOKER_RESOURCES__MAX_VMS": "3",
    }


@contextlib.contextmanager
def cluster_world(ttl: int = 4, managed_networks: bool = False) -> Iterator[World]:
    """``managed_networks``: the agents may make bridges, dnsmasq and nftables rules in their
    namespaces (the cluster-network tests); otherwise guests use user-mode networking."""
    with ExitStack() as cleanup:
        hub, *spaces = cleanup.enter_context(tn.namespaces("hub", *NAMES))
        hub.run("ip", "link", "add", "stkcbr0", "type", "bridge")
        hub.run("ip", "addr", "add", f"{HUB}/24", "dev", "stkcbr0")
        hub.run("ip", "link", "set", "stkcbr0", "up")
        for i, ns in enumerate(spaces, start=1):
            tn.veth(ns, "eth0", f"{SUBNET}.{10 + i}/24", hub, f"stkcv{i}", None)
            hub.run("ip", "link", "set", f"stkcv{i}", "master", "stkcbr0")
        etcd = cleanup.enter_context(EtcdCluster(size=3, host=HUB, netns=hub.name))
        nodes: dict[str, Node] = {}
        for name, ns in zip(NAMES, spaces, strict=True):
            env = agent_env(name, etcd, ttl)
            if managed_networks:
                env["STOKER_NETWORK__ENABLED"] = "true"
            agent = AgentProcess(wrapper=["nsenter", f"--net=/run/netns/{ns.name}"], env=env)
            nodes[name] = node = Node(name, ns, agent, env)
            cleanup.callback(_cleanup, node)
        errors: list[BaseException] = []

        def start(node: Node) -> None:
            try:
                node.agent.start()
            except BaseException as exc:  # re-raised below, in the caller's thread
                errors.append(exc)

        starters = [threading.Thread(target=start, args=(n,)) for n in nodes.values()]
        for thread in starters:
            thread.start()
        for thread in starters:
            thread.join()
        if errors:
            raise errors[0]
        monitor = Monitor(nodes)
        monitor.start()
        cleanup.callback(monitor.stop)
        world = World(hub, etcd, nodes, monitor, ttl)
        wait_for(world.ready, 30, 0.2)
        yield world
