"""Kill this node's cluster VMs when its fence deadline passes, and keep the guard process
told which VMMs those are.

Checked every 20 ms: cheap (one comparison), and the kill budget is what the check interval
eats into. Each VM goes through the lifecycle (a forced stop, recorded as "fenced: ..."), and
any VMM the lifecycle has not ended within half the kill budget (its lock held by a long
operation, say) is SIGKILLed directly by pid and start time. The guard process is the last
line: it kills by the same deadline plus half the budget, agent or no agent.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from stoker.cluster.fencing import Standing
from stoker.cluster.ownership import incarnation_of
from stoker.cluster.session import NodeSession
from stoker.domain.states import VMState
from stoker.domain.vm import VM
from stoker.host.proc import is_same_live_process, kill
from stoker.services.errors import ServiceError
from stoker.services.lifecycle import Lifecycle
from stoker.services.loops import cancel

log = logging.getLogger("stoker.cluster")

S = VMState
CHECK_S = 0.02
FENCEABLE = frozenset({S.STARTING, S.RUNNING, S.RESTARTING, S.STOPPING})


def cluster_copies(lifecycle: Lifecycle) -> list[VM]:
    return [vm for vm in lifecycle.directory.all() if incarnation_of(vm) is not None]


def guard_list(lifecycle: Lifecycle) -> dict[str, tuple[int, int] | None]:
    """vm id -> (pid, start time) of every local cluster VM (None: no VMM recorded)."""
    return {
        vm.id: (vm.process.pid, vm.process.start_time) if vm.process else None
        for vm in cluster_copies(lifecycle)
    }


class Fencer:
    def __init__(self, session: NodeSession, lifecycle: Lifecycle) -> None:
        self.session = session
        self.lifecycle = lifecycle
        self.kill_budget = session.cfg.kill_budget_s
        self.fenced_at: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._stops: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cluster fencer")

    async def stop(self) -> None:
        await cancel(self._task)
        self._task = None

    def refresh_guard(self) -> None:
        self.session.guard.set_vms(guard_list(self.lifecycle))

    async def _run(self) -> None:
        while True:
            try:
                standing = self.session.standing()
                if standing in (Standing.FENCED, Standing.EXPIRED):
                    victims = [vm for vm in cluster_copies(self.lifecycle) if _running(vm)]
                    if victims:
                        await self.fence(victims, standing)
                        await asyncio.sleep(0.25)  # let the lifecycle record them
            except Exception:
                log.exception("fencer round failed")
            await asyncio.sleep(CHECK_S)

    async def fence(self, victims: list[VM], standing: Standing) -> None:
        why = (
            f"fenced: the etcd lease is {standing.value} "
            f"({self.session.last_error or 'no renewal within the fence window'})"
        )
        log.warning("cluster: %s; killing %d cluster VM(s)", why, len(victims))
        started = asyncio.get_running_loop().time()
        tasks = [asyncio.create_task(self._stop(vm, why)) for vm in victims]
        _, pending = await asyncio.wait(tasks, timeout=self.kill_budget / 2)
        for task in pending:  # the lifecycle is slow: kill by pid, let it record later
            self._stops.add(task)
            task.add_done_callback(self._stops.discard)
        for vm in victims:
            record = self.lifecycle.directory.find(vm.id)
            process = record.process if record else vm.process
            if process and is_same_live_process(process.pid, process.start_time):
                kill(process.pid)
        self.fenced_at = asyncio.get_running_loop().time()
        log.warning("cluster: fenced %d VM(s) in %.3f s", len(victims), self.fenced_at - started)

    async def _stop(self, vm: VM, why: str) -> None:
        try:
            current = self.lifecycle.get(vm.id, 0)
            if current.state == S.RESTARTING:
                await self.lifecycle.abort(vm.id, why)
            elif current.state in FENCEABLE:
                await self.lifecycle.stop(vm.id, graceful=False, timeout_s=0, reason=why)
        except ServiceError as exc:
            log.warning("cluster: fencing %s: %s", vm.name, exc)
        except Exception:
            log.exception("cluster: fencing %s failed", vm.name)


def _running(vm: VM) -> bool:
    if vm.state in FENCEABLE:
        return True
    process = vm.process
    return process is not None and is_same_live_process(process.pid, process.start_time)
