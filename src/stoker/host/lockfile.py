"""One agent per data dir: an ``fcntl`` lock on ``<data_dir>/agent.lock`` holding the pid.

The kernel drops the lock when its holder dies (SIGKILL included), so a crash never leaves
a stale lock; the pid written inside is only there to name the holder in the refusal.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

LOCK_NAME = "agent.lock"


class AlreadyLocked(Exception):
    """Another process holds the lock; ``pid`` is what it wrote (None if unreadable)."""

    def __init__(self, path: Path, pid: int | None) -> None:
        holder = f"pid {pid}" if pid is not None else "another process"
        super().__init__(
            f"another stoker agent ({holder}) already runs on {path.parent} (it holds {path}); "
            "stop it first, or give this agent another data_dir"
        )
        self.path = path
        self.pid = pid


@dataclass
class DataDirLock:
    path: Path
    fd: int

    def release(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)  # closing drops the lock; the file stays (harmless)
            self.fd = -1


def acquire(data_dir: Path) -> DataDirLock:
    """Take the data dir's lock or raise AlreadyLocked naming the holder's pid."""
    path = data_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _read_pid(fd)
        os.close(fd)
        raise AlreadyLocked(path, pid) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return DataDirLock(path, fd)


def holder(data_dir: Path) -> int | None:
    """The pid of the agent holding ``data_dir``'s lock, or None when nobody holds it."""
    path = data_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or -1
        return None
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip())
    return None
