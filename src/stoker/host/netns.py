"""Run a bit of code, or a command, inside a named network namespace (``ip netns`` style).

In production stoker works in the host namespace (``netns=None`` everywhere); the tests run
the same code against namespaces they create. In-process work (opening a TAP descriptor,
writing a per-namespace sysctl) happens on a short-lived thread that joins the namespace,
because ``setns`` moves only the calling thread and the rest of the process must stay
where it is. Commands run under ``ip netns exec``, which execs in place, so the pid a caller
gets is the pid of the command itself.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

__all__ = ["NETNS_DIR", "NetnsError", "call_in_netns", "netns_argv", "write_sysctl"]

NETNS_DIR = Path("/run/netns")
_CLONE_NEWNET = 0x40000000
T = TypeVar("T")


class NetnsError(RuntimeError):
    """The namespace is missing or cannot be entered."""


def _netns_path(netns: str) -> Path:
    if not netns or "/" in netns or netns in (".", ".."):
        raise NetnsError(f"invalid network namespace name {netns!r}")
    path = NETNS_DIR / netns
    if not path.exists():
        raise NetnsError(f"network namespace {netns!r} does not exist (no {path})")
    return path


def netns_argv(netns: str | None) -> list[str]:
    """The prefix that runs a command in ``netns`` (empty for the current namespace)."""
    if netns is None:
        return []
    _netns_path(netns)
    return ["ip", "netns", "exec", netns]


def call_in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """``fn()`` with the calling thread inside ``netns``; in place when ``netns`` is None.

    File descriptors ``fn`` opens stay bound to that namespace after the thread ends.
    """
    if netns is None:
        return fn()
    path = _netns_path(netns)
    results: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    reason = os.strerror(ctypes.get_errno())
                    raise NetnsError(f"cannot enter network namespace {netns!r}: {reason}")
            finally:
                os.close(fd)
            results.append(fn())
        except BaseException as exc:  # re-raised in the caller's thread below
            errors.append(exc)

    worker = threading.Thread(target=run, name=f"netns-{netns}", daemon=True)
    worker.start()
    worker.join()
    if errors:
        raise errors[0]
    return results[0]


def write_sysctl(key: str, value: str, netns: str | None = None) -> None:
    """Set a sysctl in ``netns``; /proc/sys/net is per namespace.

    ``key`` is dotted (``net.ipv4.ip_forward``) or, when a part holds a dot (an interface
    name), slash-separated (``net/ipv4/conf/br.1/route_localnet``).
    """
    path = Path("/proc/sys") / (key if "/" in key else key.replace(".", "/"))

    def write() -> None:
        try:
            path.write_text(value)
        except OSError as exc:
            raise NetnsError(f"cannot set {key}={value}: {exc}") from exc

    call_in_netns(netns, write)
