"""Publishes events: persisted in the bounded log, then handed to live subscribers.

Subscribers are queues (for the SSE stream) and callbacks (hooks, recovery, alerts). A slow
subscriber never holds up a publisher: a full queue drops its oldest event and counts it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from stoker.domain.events import Event, EventType
from stoker.store.events import EventStore

log = logging.getLogger("stoker.events")

Listener = Callable[[Event], Awaitable[None] | None]


class EventBus:
    def __init__(self, store: EventStore, clock: Callable[[], datetime] | None = None) -> None:
        self.store = store
        self.clock = clock or (lambda: datetime.now(UTC))
        self._queues: set[asyncio.Queue[Event]] = set()
        self._listeners: list[Listener] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def publish(
        self, type: EventType, message: str, vm_id: str | None = None, **data: Any
    ) -> Event:
        event = self.record(type, message, vm_id, **data)
        self.deliver(event)
        return event

    def record(self, type: EventType, message: str, vm_id: str | None = None, **data: Any) -> Event:
        """Persist only (inside a caller's transaction, say); :meth:`deliver` after commit."""
        return self.store.append(self.clock(), vm_id, type, message, data)

    def deliver(self, event: Event) -> None:
        """Hand a recorded event to the log, the queues and the listeners."""
        log.info(
            event.message,
            extra={"event": event.type, "vm_id": event.vm_id, "details": event.data or None},
        )
        for queue in list(self._queues):
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(event)
        for listener in list(self._listeners):
            try:
                result = listener(event)
            except Exception:  # a listener bug must not break the publisher
                log.exception("event listener failed", extra={"event": event.type})
                continue
            if asyncio.iscoroutine(result):
                task = asyncio.ensure_future(result)
                self._tasks.add(task)
                task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("event listener failed: %s", task.exception())

    def subscribe(self, maxsize: int = 1000) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=maxsize)
        self._queues.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        self._queues.discard(queue)

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def drain(self) -> None:
        """Wait for listener tasks already started (used at shutdown and in tests)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
