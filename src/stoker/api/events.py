"""/api/v1/events: the bounded event log, and a live stream of it as server-sent events."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import StreamingResponse

from stoker.api.deps import services
from stoker.api.problems import PROBLEM_RESPONSES
from stoker.domain.events import Event
from stoker.domain.units import parse_duration
from stoker.services.container import Services
from stoker.services.errors import InvalidSpec, NotFound
from stoker.wire import EventOut

router = APIRouter(prefix="/api/v1/events", tags=["events"], responses=PROBLEM_RESPONSES)

Svc = Annotated[Services, Depends(services)]
VMRef = Annotated[str | None, Query(description="VM name or id", max_length=64)]
TypeFilter = Annotated[
    str | None,
    Query(
        description="event type, exact ('vm.state') or a prefix ending in '*' ('vm.*')",
        max_length=100,
    ),
]
After = Annotated[int | None, Query(ge=0, le=2**62, description="only events with a larger id")]

HEARTBEAT_S = 15.0
_ID = re.compile(r"^[0-9a-f]{16}$")


def _vm_id(svc: Services, ref: str | None) -> str | None:
    """A name or id of a VM; the id of a deleted VM still finds its events."""
    if ref is None:
        return None
    try:
        return svc.directory.get(ref, 0).id
    except NotFound:
        if _ID.match(ref):
            return ref
        raise NotFound(f"no VM named or with id {ref!r}") from None


def _since(text: str | None) -> datetime | None:
    """An ISO 8601 time (UTC if no offset) or a duration back from now ('10m', '2h')."""
    if text is None:
        return None
    try:
        return datetime.now(UTC) - timedelta(seconds=parse_duration(text))
    except ValueError as exc:  # also a duration over the century every duration is held to
        not_a_duration = str(exc)
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidSpec(
            "since",
            f"{text!r} is neither a time ('2026-11-21T06:30:00Z') nor a duration ('10m'): "
            f"{not_a_duration}",
        ) from None
    try:
        return (at if at.tzinfo else at.replace(tzinfo=UTC)).astimezone(UTC)
    except OverflowError:
        raise InvalidSpec("since", f"{text!r} is out of range") from None


def _matches(event: Event, vm_id: str | None, type_: str | None) -> bool:
    if vm_id is not None and event.vm_id != vm_id:
        return False
    if type_ is None:
        return True
    return event.type.startswith(type_[:-1]) if type_.endswith("*") else event.type == type_


@router.get("", response_model=list[EventOut])
async def list_events(
    svc: Svc,
    vm: VMRef = None,
    since: Annotated[
        str | None,
        Query(max_length=64, description="ISO 8601 time, or a duration back from now: '10m'"),
    ] = None,
    type: TypeFilter = None,
    after: After = None,
    limit: Annotated[int, Query(ge=1, le=10_000, description="the most recent N")] = 100,
) -> list[EventOut]:
    """Events, oldest first (the most recent ``limit`` of those that match).

    Live: ``GET /api/v1/events/stream?vm=&type=&after=`` answers ``text/event-stream``
    (server-sent events: ``id``, ``event`` = the type, ``data`` = this same JSON object) and
    honours ``Last-Event-ID`` on reconnect.
    """
    events = svc.events.store.query(
        vm_id=_vm_id(svc, vm), since=_since(since), type=type, after_id=after, limit=limit
    )
    return [EventOut.model_validate(e) for e in events]


@router.get(
    "/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "server-sent events"}},
    # an endless stream is not a request/response operation: kept out of the OpenAPI document
    # (and so out of schema fuzzing); documented on GET /api/v1/events
    include_in_schema=False,
)
async def stream_events(
    request: Request,
    svc: Svc,
    vm: VMRef = None,
    type: TypeFilter = None,
    after: After = None,
    last_event_id: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> StreamingResponse:
    """Live events as ``text/event-stream``: ``id``, ``event`` (the type) and ``data`` (JSON).

    With ``after`` (or the ``Last-Event-ID`` header a reconnecting client sends) the events
    already logged after that id come first, so nothing is missed across a reconnect.
    """
    vm_id = _vm_id(svc, vm)
    if after is None and last_event_id and last_event_id.isdigit():
        after = int(last_event_id)
    queue = svc.events.subscribe()  # before the replay, so nothing falls in between

    async def body() -> AsyncIterator[str]:
        last = after or 0
        try:
            yield ": stoker event stream\n\n"
            if after is not None:
                for event in svc.events.store.query(
                    vm_id=vm_id, type=type, after_id=after, limit=10_000
                ):
                    last = event.id
                    yield _sse(event)
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), HEARTBEAT_S)
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    yield ": keep-alive\n\n"
                    continue
                if event.id > last and _matches(event, vm_id, type):
                    last = event.id
                    yield _sse(event)
        finally:
            svc.events.unsubscribe(queue)

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _sse(event: Event) -> str:
    data = EventOut.model_validate(event).model_dump_json()
    return f"id: {event.id}\nevent: {event.type}\ndata: {data}\n\n"
