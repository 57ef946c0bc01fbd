"""A Background that runs one coroutine at a fixed interval until the agent stops.

Several capabilities need exactly this (quota monitoring, resource sampling, automatic
snapshots, watchdogs): start a task, keep going after a failing round (logged, never a loop
that dies silently), and cancel cleanly on stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("stoker.loops")


async def cancel(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` (if there is one) and wait until it has ended: what every background
    loop's ``stop`` does. Its CancelledError ends here; any other error it ends with is raised."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class PeriodicTask:
    """Runs ``tick`` now and then again ``interval_s`` seconds after each round ends, or,
    with ``fixed_rate``, every ``interval_s`` from the first round (a sampler wants evenly
    spaced samples); a round that overruns is not caught up in a burst."""

    def __init__(
        self,
        name: str,
        tick: Callable[[], Awaitable[None]],
        interval_s: float,
        *,
        fixed_rate: bool = False,
    ) -> None:
        self.name = name
        self.tick = tick
        self.interval_s = interval_s
        self.fixed_rate = fixed_rate
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        await cancel(self._task)
        self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            try:
                await self.tick()
            except Exception:  # one failing round must not end the loop
                log.exception("%s: round failed; next in %gs", self.name, self.interval_s)
            if self.fixed_rate:
                next_at = max(next_at + self.interval_s, loop.time())
            else:
                next_at = loop.time() + self.interval_s
            await asyncio.sleep(next_at - loop.time())
