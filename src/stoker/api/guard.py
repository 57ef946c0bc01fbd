"""The guards in front of the API: a connection gate per listener and a body size limit.

- the gate (a subclass of uvicorn's HTTP protocol, one per listener) answers a connection
  beyond ``max_connections`` with a 503 problem and closes it at once; closes a connection
  whose request head has not arrived ``header_timeout_s`` after it opened (or after the
  previous answer: idle and slowloris clients); answers a head over ``max_header_bytes``
  with 431; and answers what the HTTP parser refuses as problem+json too;
- ``BodyLimit`` (ASGI) answers a body over ``max_body_bytes`` with 413 problem+json before
  anything parses it.

``serve.py`` puts them in front of each listener's app.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from stoker.api.problems import PROBLEM, problem_body

log = logging.getLogger("stoker.api")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class Limits:
    max_connections: int = 128
    header_timeout_s: float = 10.0
    keepalive_timeout_s: float = 5.0
    max_header_bytes: int = 64 * 1024
    max_body_bytes: int = 1024 * 1024


# ------------------------------------------------------------------------ connection gate


@dataclass
class ConnectionGate:
    """How many connections one listener holds, and how many it may."""

    limit: int
    open: int = 0
    refused: int = 0


def _raw_problem(status: int, reason: str, detail: str, extra: bytes = b"") -> bytes:
    """A whole HTTP/1.1 answer with a problem+json body, for answers given before (or
    instead of) the application: the connection closes after it."""
    body = problem_body(status, reason, detail)
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {PROBLEM}\r\nConnection: close\r\n"
        f"Content-Length: {len(body)}\r\n".encode()
        + extra
        + b"\r\n"
        + body
    )


_BUSY_RESPONSE = _raw_problem(
    503,
    "Service Unavailable",
    "this listener is at its connection limit (api.max_connections); retry shortly",
    b"Retry-After: 1\r\n",
)


def guarded_protocol(gate: ConnectionGate, limits: Limits) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol with this listener's gate, head timeout and head size cap."""

    class GuardedHttp(HttpToolsProtocol):
        _admitted = False
        _head_timer: asyncio.TimerHandle | None = None
        _head_bytes = 0

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            if gate.open >= gate.limit:
                gate.refused += 1
                if gate.refused in (1, 100) or gate.refused % 10_000 == 0:
                    log.warning(
                        "a listener is at its limit of %d connections; refused %d so far",
                        gate.limit,
                        gate.refused,
                    )
                transport.write(_BUSY_RESPONSE)
                transport.close()
                return
            gate.open += 1
            self._admitted = True
            super().connection_made(transport)
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            if not self._admitted:
                return
            self._admitted = False
            gate.open -= 1
            self._disarm_head_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            waiting = self._head_timer is not None
            super().data_received(data)
            # still no complete head after this chunk (body bytes after a complete head
            # are the body limit's business)
            if waiting and self._head_timer is not None:
                self._head_bytes += len(data)
                if self._head_bytes > limits.max_header_bytes:
                    self._disarm_head_timer()
                    self.transport.write(
                        _raw_problem(
                            431,
                            "Request Header Fields Too Large",
                            f"the request line and headers exceed {limits.max_header_bytes} "
                            "bytes (api.max_header_bytes)",
                        )
                    )
                    self.transport.close()

        def send_400_response(self, msg: str) -> None:
            """A request the HTTP parser refused, answered as problem+json like the rest."""
            self.transport.write(_raw_problem(400, "Bad Request", msg))
            self.transport.close()

        def on_headers_complete(self) -> None:
            self._disarm_head_timer()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_head_timer()

        def _arm_head_timer(self) -> None:
            self._disarm_head_timer()
            self._head_bytes = 0
            self._head_timer = self.loop.call_later(limits.header_timeout_s, self._head_late)

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_late(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return GuardedHttp


# ------------------------------------------------------------------------------ body size


class BodyLimit:
    """Answer 413 problem+json to a body over ``max_bytes`` before the app parses any of it.

    The body is read (at most ``max_bytes``) and handed on in one piece: the API's bodies are
    small JSON documents, and this is what keeps one request from costing the agent more
    memory than the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                await self.app(scope, _replay([message], receive), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        whole = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([whole], receive), send)

    async def _refuse(self, send: Send) -> None:
        body = problem_body(
            413,
            "Request body too large",
            f"the request body is larger than {self.max_bytes} bytes (api.max_body_bytes)",
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", PROBLEM.encode()),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() and len(text) < 20 else 1 << 62
    return None


def _replay(first: list[Message], receive: Receive) -> Receive:
    pending = list(first)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
