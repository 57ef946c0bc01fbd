"""Keeps each network's dnsmasq running: its death is seen through a pidfd (for a dnsmasq
this agent started and for one re-adopted after an agent restart alike) and it is started
again after a short delay, doubled while it keeps dying soon after each start.

Stopping the supervisor (the agent stops) leaves every dnsmasq running: guests keep their
DHCP service while the agent is away, as they keep their VMMs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from stoker.host.dnsmasq import DnsmasqProcess
from stoker.host.proc import ExitWatch

__all__ = ["MAX_DELAY_S", "DnsmasqSupervisor"]

log = logging.getLogger("stoker.networks")

MAX_DELAY_S = 60.0

#: starts the network's dnsmasq again; None when the network is gone (stop watching)
Restart = Callable[[str], Awaitable[DnsmasqProcess | None]]


class DnsmasqSupervisor:
    def __init__(self, restart: Restart, delay_s: float = 0.5, stable_s: float = 30.0) -> None:
        self.restart = restart
        self.delay_s = delay_s
        self.stable_s = stable_s
        self._tasks: dict[str, asyncio.Task[None]] = {}
        #: network id -> how many times its dnsmasq was restarted (the API shows it)
        self.restarts: dict[str, int] = {}

    def watch(self, network_id: str, process: DnsmasqProcess) -> None:
        """Watch ``process`` (replacing any earlier watch of the network)."""
        self.unwatch(network_id)
        self._tasks[network_id] = asyncio.create_task(
            self._run(network_id, process), name=f"dnsmasq {network_id}"
        )

    def unwatch(self, network_id: str) -> None:
        """Stop watching before a deliberate stop, so the death is not taken for a crash."""
        task = self._tasks.pop(network_id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def watching(self, network_id: str) -> bool:
        return network_id in self._tasks

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, network_id: str, process: DnsmasqProcess) -> None:
        delay = self.delay_s / 2
        while True:
            started = time.monotonic()
            watch = ExitWatch(process.pid, process.child)
            try:
                status = await watch.exited
            finally:
                watch.cancel()
            lived = time.monotonic() - started
            delay = self.delay_s if lived >= self.stable_s else min(delay * 2, MAX_DELAY_S)
            log.warning(
                "dnsmasq %s of network %s ended (%s) after %.1f s; starting it again in %.1f s",
                process.pid,
                network_id,
                status.describe("dnsmasq"),
                lived,
                delay,
            )
            replacement: DnsmasqProcess | None = None
            while replacement is None:
                await asyncio.sleep(delay)
                try:
                    replacement = await self.restart(network_id)
                except Exception as exc:  # keep trying: a network without DHCP is worse
                    delay = min(delay * 2, MAX_DELAY_S)
                    log.error("restarting dnsmasq of network %s failed: %s", network_id, exc)
                    continue
                if replacement is None:
                    with contextlib.suppress(KeyError):
                        if self._tasks[network_id] is asyncio.current_task():
                            del self._tasks[network_id]
                    return
            self.restarts[network_id] = self.restarts.get(network_id, 0) + 1
            process = replacement
