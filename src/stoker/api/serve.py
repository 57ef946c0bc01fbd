"""Serving the API: the listeners, their limits, TLS, and the descriptor budget.

One uvicorn server per listener (the Unix socket; TCP when configured), each behind its own
guards (``guard.py``: connection cap, head timeout and size, body size), so a flood on TCP
never locks out the Unix socket. The limits are in ``[api]`` and described in
docs/security.md ("Agent limits"). Beyond the guards:

- ``keepalive_timeout_s`` closes idle keep-alive connections between requests;
- the soft descriptor limit (RLIMIT_NOFILE) is raised to the hard limit at start;
- asyncio accepts up to ``backlog`` connections in one burst before any is handed to a
  protocol (so before the gate can close it): the burst is kept at ``ACCEPT_BURST``, and
  asyncio's "out of system resource" accept errors (it logs one per connection of a burst
  and keeps retrying, thousands a second) are folded into one warning per 10 s.

A Unix socket is replaced only when nothing answers on it (a stale file from a crash), and
unlinked at exit only if it is still the one this agent bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import socket
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn

from stoker.api.guard import ASGIApp, BodyLimit, ConnectionGate, Limits, guarded_protocol

__all__ = ["Limits", "ServeError", "Serving"]

log = logging.getLogger("stoker.api")

#: the soft descriptor limit the agent asks for (bounded by the hard limit)
WANTED_NOFILE = 65_536
#: connections asyncio accepts per readiness event (uvicorn's backlog); each holds a
#: descriptor until the gate sees it, so this bounds the spike a flood causes
ACCEPT_BURST = 32
_ACCEPT_FAILED = "socket.accept() out of system resource"


class ServeError(Exception):
    """A listener cannot be set up; the message says what to fix."""


# ----------------------------------------------------------------------------- descriptors


def raise_descriptor_limit(wanted: int = WANTED_NOFILE) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE towards ``wanted`` (never above the hard limit); returns
    (soft, hard) as they are afterwards. Every VM holds a few descriptors (its pidfd, its
    QMP connection), and the listeners hold one per client."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def quiet_accept_errors(loop: asyncio.AbstractEventLoop, every_s: float = 10.0) -> None:
    """Fold asyncio's accept errors (EMFILE and friends) into one warning per ``every_s``."""
    state = {"last": -every_s, "count": 0}

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != _ACCEPT_FAILED:
            loop.default_exception_handler(context)
            return
        state["count"] += 1
        now = loop.time()
        if now - state["last"] >= every_s:
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            log.warning(
                "accepting connections failed %d times (%s); the descriptor limit is %d: "
                "lower api.max_connections or raise the limit",
                state["count"],
                context.get("exception"),
                soft,
            )
            state["last"], state["count"] = now, 0

    loop.set_exception_handler(handler)


# ------------------------------------------------------------------------------- listeners


@dataclass
class UnixListener:
    """A bound Unix socket and the identity of the file it made (to unlink only that)."""

    path: Path
    sock: socket.socket
    inode: tuple[int, int]

    def unlink_if_ours(self) -> None:
        """Remove the socket file only if it is still the one this agent bound: another
        agent may have replaced it (it must never lose its socket to us)."""
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self.inode:
                os.unlink(self.path)


def check_socket_free(path: Path) -> bool:
    """Raise ServeError when ``path`` is not a socket or another process serves it; True
    when a stale socket file (a crashed agent's) is there to replace."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        raise ServeError(f"{path} exists and is not a socket; move it away or set api.socket")
    if _answers(path):
        raise ServeError(
            f"{path} is served by another process (another stoker agent?); stop it, or "
            "give this agent another api.socket"
        )
    return True


def listen_unix(path: Path, mode: int, backlog: int = 128) -> UnixListener:
    """Bind ``path``; a socket file already there is replaced only when nobody answers on it
    (a crashed agent's), never when another process serves it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if check_socket_free(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, mode)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    st = os.lstat(path)
    return UnixListener(path, sock, (st.st_dev, st.st_ino))


def _answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError as exc:
        # EAGAIN (a full backlog) and the like: someone is there
        return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    finally:
        probe.close()
    return True


def listen_tcp(host: str, port: int, backlog: int = 128) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def check_tls_files(cert: Path, key: Path) -> None:
    """Both files readable, and the private key readable by nobody but its owner."""
    for what, path in (("api.tls_cert", cert), ("api.tls_key", key)):
        try:
            st = os.stat(path)
        except OSError as exc:
            raise ServeError(f"{what} {path} cannot be read: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise ServeError(f"{what} {path} is not a file")
    if os.stat(key).st_mode & 0o077:
        raise ServeError(f"api.tls_key {key} can be read by other users: `chmod 600 {key}`")


# -------------------------------------------------------------------------------- servers


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the agent owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class Serving:
    """The running servers, one per listener, and what stopping them must undo."""

    servers: list[uvicorn.Server] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    gates: dict[str, ConnectionGate] = field(default_factory=dict)
    unix: UnixListener | None = None

    def add(
        self,
        name: str,
        app: ASGIApp,
        sock: socket.socket,
        limits: Limits,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        gate = self.gates[name] = ConnectionGate(limits.max_connections)
        config = uvicorn.Config(
            BodyLimit(app, limits.max_body_bytes),
            http=guarded_protocol(gate, limits),
            lifespan="off",
            log_config=None,
            access_log=False,
            backlog=ACCEPT_BURST,
            timeout_keep_alive=limits.keepalive_timeout_s,  # type: ignore[arg-type]
            ssl_certfile=tls[0] if tls else None,
            ssl_keyfile=tls[1] if tls else None,
        )
        server = _Server(config)
        self.servers.append(server)
        self.tasks.append(asyncio.create_task(server.serve(sockets=[sock]), name=f"api {name}"))

    async def close(self) -> None:
        for server in self.servers:
            server.should_exit = True
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.unix is not None:
            self.unix.unlink_if_ours()
