"""SIGKILL the agent at random points of its work, restart it, and check that nothing is
lost: the harness ``tests/faults/test_kill9.py`` runs a few rounds of, and ``bench/chaos.py``
hundreds.

One round: bring the world to where the operation can run, send the request, kill -9 the
agent a random time later (or, for "start", kill the agent itself while it starts), start a
new agent, let the VMs settle, and check the invariants:

- every VM is still known (a VM being deleted may be gone), every snapshot too (one being
  deleted or pruned may be gone, one being taken may have appeared);
- every running VM's recorded pid is a live process, and no pid is claimed by two VMs;
- no VMM runs for a VM that is stopped or pending, and none for a VM the agent does not know
  (no orphan);
- every snapshot the agent lists verifies (sizes and checksums), and no half snapshot
  (``.tmp-``, ``.del-``) is left in any snapshot directory.

Then the world is healed (a VM in error is stopped, a deleted one made again) for the next
round.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stoker.client import Client
from tests.helpers import AgentProcess, guest_spec, pid_alive, wait_for

OPERATIONS = (
    "agent-start",
    "start",
    "stop",
    "restart",
    "snapshot",
    "restore",
    "delete",
    "prune",
)
#: the longest the killed request may take (the kill falls somewhere in it)
WINDOW_S = {
    "agent-start": 0.8,
    "start": 3.0,
    "stop": 1.0,
    "restart": 3.0,
    "snapshot": 0.6,
    "restore": 1.0,
    "delete": 0.3,
    "prune": 0.4,
}
NAMES = ("ca", "cb")
SETTLED = {"running", "stopped", "pending", "error"}


@dataclass
class Round:
    number: int
    operation: str
    delay_s: float
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


class Chaos:
    def __init__(self, agent: AgentProcess, rng: random.Random) -> None:
        self.agent = agent
        self.rng = rng

    def api(self) -> Client:
        return self.agent.client()

    # --------------------------------------------------------------------------- setup

    def ensure_vm(self, name: str, running: bool) -> None:
        with self.api() as api:
            if name not in {vm.name for vm in api.list_vms()}:
                api.create_vm(guest_spec(name, memory_mib=128))
            vm = api.get_vm(name)
            if vm.state == "error":
                vm = api.stop_vm(name, graceful=False)
            if running and vm.state in ("pending", "stopped"):
                vm = api.start_vm(name, wait=True, timeout_s=90)
            if not running and vm.state == "running":
                api.stop_vm(name, graceful=False)

    def ensure_snapshot(self, name: str) -> str:
        with self.api() as api:
            snaps = api.list_snapshots(name)
            if snaps:
                return snaps[-1].id
            return api.create_snapshot(name).id

    # ---------------------------------------------------------------------------- rounds

    def prepare(self, operation: str) -> tuple[Callable[[Client], Any], str]:
        """Bring the world to where ``operation`` can run; the request and its VM."""
        name = self.rng.choice(NAMES)
        if operation == "start":
            self.ensure_vm(name, running=False)
            return lambda api: api.start_vm(name, wait=True, timeout_s=90), name
        if operation in ("stop", "restart"):
            self.ensure_vm(name, running=True)
            graceful = self.rng.random() < 0.5
            if operation == "stop":
                return lambda api: api.stop_vm(name, graceful=graceful, timeout_s=2), name
            return lambda api: api.restart_vm(name, graceful=graceful), name
        if operation == "snapshot":
            self.ensure_vm(name, running=self.rng.random() < 0.7)
            return lambda api: api.create_snapshot(name), name
        if operation == "restore":
            self.ensure_vm(name, running=True)
            snapshot = self.ensure_snapshot(name)
            return lambda api: api.restore_snapshot(snapshot), name
        if operation == "delete":
            self.ensure_vm(name, running=self.rng.random() < 0.5)
            mode = self.rng.choice(["keep", "delete"])
            return lambda api: api.delete_vm(name, force=True, snapshots=mode), name
        if operation == "prune":
            self.ensure_vm(name, running=True)
            self.ensure_snapshot(name)
            with self.api() as api:
                api.create_snapshot(name)
                api.set_snapshot_policy(name, retention="last:1")
            return lambda api: api.prune_snapshots(name), name
        return lambda api: api.version(), name

    def round(self, number: int, operation: str) -> Round:
        began = time.monotonic()
        delay = self.rng.uniform(0, WINDOW_S[operation])
        result = Round(number, operation, delay)
        if operation == "agent-start":
            self.ensure_vm(self.rng.choice(NAMES), running=True)
        request, name = self.prepare(operation)
        before = self.known()
        if operation == "agent-start":
            self.agent.signal(signal.SIGKILL)
            self.agent.proc = None
            self._start_and_kill(delay)
        else:
            worker = threading.Thread(target=self._call, args=(request,), daemon=True)
            worker.start()
            time.sleep(delay)
            self.agent.signal(signal.SIGKILL)
            worker.join(30)
        self.agent.start(timeout=60)
        self.settle()
        result.problems = self.check(before, operation, name)
        self.heal()
        result.seconds = time.monotonic() - began
        return result

    def _call(self, request: Callable[[Client], Any]) -> None:
        with contextlib.suppress(Exception), self.api() as api:  # the agent dies under it
            request(api)

    def _start_and_kill(self, delay: float) -> None:
        """Kill a new agent ``delay`` seconds into its start (or just after, if it was
        quicker)."""

        def start() -> None:
            with contextlib.suppress(RuntimeError):  # "exited early": we killed it
                self.agent.start(timeout=60)

        starting = threading.Thread(target=start, daemon=True)
        starting.start()
        wait_for(lambda: self.agent.proc is not None, 10, interval=0.001)
        time.sleep(delay)
        self.agent.signal(signal.SIGKILL)
        starting.join(60)

    def settle(self, timeout_s: float = 90) -> None:
        def settled() -> bool:
            with self.api() as api:
                return all(vm.state in SETTLED for vm in api.list_vms())

        wait_for(settled, timeout_s, interval=0.1)

    # ---------------------------------------------------------------------------- checks

    def known(self) -> tuple[set[str], set[str]]:
        with self.api() as api:
            return {vm.name for vm in api.list_vms()}, {s.id for s in api.list_snapshots()}

    def check(self, before: tuple[set[str], set[str]], operation: str, name: str) -> list[str]:
        problems = []
        vms_before, snaps_before = before
        with self.api() as api:
            vms = api.list_vms()
            snaps = api.list_snapshots()
            names = {vm.name for vm in vms}
            may_go = {name} if operation == "delete" else set()
            lost = vms_before - names - may_go
            if lost:
                problems.append(f"VMs lost: {sorted(lost)}")
            ids = {s.id for s in snaps}
            may_vanish = snaps_before if operation in ("delete", "prune") else set()
            if snaps_before - ids - may_vanish:
                problems.append(f"snapshots lost: {sorted(snaps_before - ids - may_vanish)}")
            claimed: dict[int, str] = {}
            for vm in vms:
                pid = vm.process.pid if vm.process else None
                if vm.state == "running":
                    if pid is None or not pid_alive(pid):
                        problems.append(f"{vm.name} is running but its VMM {pid} is not alive")
                    elif pid in claimed:
                        problems.append(f"pid {pid} claimed by {vm.name} and {claimed[pid]}")
                    else:
                        claimed[pid] = vm.name
            by_id = {vm.id: vm for vm in vms}
            for pid, vm_id in vmm_processes(self.agent.data_dir).items():
                owner = by_id.get(vm_id)
                if owner is None:
                    problems.append(f"orphan VMM pid {pid} of unknown VM {vm_id}")
                elif owner.state in ("stopped", "pending"):
                    problems.append(f"VMM pid {pid} runs for {owner.name}, which is {owner.state}")
                elif owner.state == "running" and claimed.get(pid) != owner.name:
                    problems.append(f"VMM pid {pid} of {owner.name} is not the one it records")
            for snap in snaps:
                verified = api.verify_snapshot(snap.id)
                if not (verified.last_verification and verified.last_verification.ok):
                    detail = verified.last_verification.detail if verified.last_verification else ""
                    problems.append(f"snapshot {snap.id} does not verify: {detail}")
        for leftover in half_snapshots(self.agent.data_dir):
            problems.append(f"half snapshot left: {leftover}")
        return problems

    def heal(self) -> None:
        """Ready for the next round: no VM in error, at most two snapshots a VM (each is a
        90 MB memory file to verify), none kept of a deleted VM."""
        with self.api() as api:
            vms = api.list_vms()
            for vm in vms:
                if vm.state == "error":
                    api.stop_vm(vm.name, graceful=False)
            ids = {vm.id for vm in vms}
            by_vm: dict[str, list[str]] = {}
            for snap in api.list_snapshots():  # oldest first
                by_vm.setdefault(snap.vm_id, []).append(snap.id)
            for vm_id, snaps in by_vm.items():
                for snapshot_id in snaps if vm_id not in ids else snaps[:-2]:
                    api.delete_snapshot(snapshot_id, force=True)


def vmm_processes(data_dir: Path) -> dict[int, str]:
    """pid -> VM id of every live VMM started for a VM of ``data_dir``: a QEMU holding a file
    under it open (its console log; confined VMMs name no path in their argv), its VM id
    from the ``process=stoker-<id>`` tag. Other agents' VMMs on the host are not counted."""
    found: dict[int, str] = {}
    root = str(data_dir) + "/"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            fds = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
        except OSError:
            continue
        tags = [
            a.split("process=stoker-", 1)[1].split(",", 1)[0]
            for a in args
            if "process=stoker-" in a
        ]
        if tags and any(f.startswith(root) for f in fds) and pid_alive(int(proc.name)):
            found[int(proc.name)] = tags[0]
    return found


def half_snapshots(data_dir: Path) -> list[Path]:
    """``.tmp-`` and ``.del-`` directories: a snapshot being written or removed."""
    roots = [data_dir / "kept-snapshots", *(data_dir / "vms").glob("*/snapshots")]
    return [
        entry
        for root in roots
        if root.is_dir()
        for entry in root.iterdir()
        if entry.name.startswith((".tmp-", ".del-"))
    ]
