"""The systemd notify protocol: READY=1, WATCHDOG=1, STOPPING=1 to ``$NOTIFY_SOCKET``.

Each message is one datagram on a Unix socket (an abstract one when the path starts with
``@``); no maintained small library does only this, and it is a few lines. Outside systemd
(no ``$NOTIFY_SOCKET``) every call does nothing.

The watchdog pings come from a task on the agent's event loop: a loop that hangs stops
pinging, and systemd (``WatchdogSec=``) restarts the agent, which lets go of no VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("stoker.systemd")


class Notifier:
    """Talks to the service manager that started this process, if any."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_s = _watchdog_interval(env)
        self._watchdog: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` fields in one datagram; False when there is no manager (or it
        cannot be reached: the agent never stops for that, it logs it)."""
        if self.address is None:
            return False
        message = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall(message)
        except OSError as exc:
            log.warning("cannot notify the service manager at NOTIFY_SOCKET: %s", exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        """Start-up is complete (VMs re-adopted, listeners serving)."""
        return self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1", "STATUS=stopping; VMs keep running")

    def start_watchdog(self) -> None:
        """Ping WATCHDOG=1 at half the interval systemd asked for, from this event loop."""
        if self.enabled and self.watchdog_s is not None and self._watchdog is None:
            self._watchdog = asyncio.create_task(self._ping(self.watchdog_s / 2), name="watchdog")

    async def stop_watchdog(self) -> None:
        task, self._watchdog = self._watchdog, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _ping(self, every_s: float) -> None:
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(every_s)


def _address(value: str) -> str | None:
    if not value:
        return None
    if value.startswith("@"):  # an abstract socket
        return "\0" + value[1:]
    return value if value.startswith("/") else None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """``$WATCHDOG_USEC`` in seconds, when it is meant for this process."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1_000_000
