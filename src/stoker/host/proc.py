"""Process identity and death watching.

A pid alone is not an identity (pids are reused) and "is it alive?" is a bad question on a
host whose PID 1 reaps late: a zombie answers signal 0. So a VMM is known by its pid plus its
start time from /proc/<pid>/stat, and its death is watched through a pidfd, which becomes
readable the moment the process exits, zombie or not, child or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcStat:
    pid: int
    state: str  # R, S, D, Z (zombie), T (stopped), X (dead), ...
    start_time: int  # clock ticks since boot


def read_stat(pid: int) -> ProcStat | None:
    """Parse /proc/<pid>/stat; None if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # the command name is in parentheses and may itself contain spaces or parentheses
    rest = raw[raw.rindex(")") + 2 :].split()
    return ProcStat(pid=pid, state=rest[0], start_time=int(rest[19]))


def read_start_time(pid: int) -> int | None:
    stat = read_stat(pid)
    return stat.start_time if stat else None


def is_same_live_process(pid: int, start_time: int) -> bool:
    """True when ``pid`` is still the process that started at ``start_time`` and not a zombie."""
    stat = read_stat(pid)
    return stat is not None and stat.start_time == start_time and stat.state not in ("Z", "X")


def read_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def find_processes_with_arg(fragment: str) -> list[int]:
    """Pids whose command line has an argument containing ``fragment`` (orphan discovery)."""
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and any(fragment in a for a in read_cmdline(int(entry.name))):
            stat = read_stat(int(entry.name))
            if stat and stat.state not in ("Z", "X"):
                pids.append(int(entry.name))
    return pids


def spawn_detached(
    argv: Sequence[str],
    log_path: Path,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    pass_fds: Sequence[int] = (),
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session with output to ``log_path``, never to a pipe.

    Its own session keeps it out of the agent's process group, so a Ctrl-C or a SIGTERM to
    the agent's group never reaches a VMM; files instead of pipes mean a dead agent never
    blocks a VMM's writes. ``env`` replaces the agent's environment (None inherits it; pass
    ``stoker.host.confine.minimal_env()`` so no token leaks). ``pass_fds`` are inherited under
    the same numbers (disks, sockets, TAP queues handed to the VMM); every other descriptor
    is closed in the child.
    """
    with open(log_path, "ab", buffering=0) as log:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            start_new_session=True,
            close_fds=True,
            pass_fds=tuple(pass_fds),
        )


@dataclass(frozen=True)
class ExitStatus:
    """How a VMM ended, as far as we can know: only its parent learns the code."""

    code: int | None = None
    signal: int | None = None

    def describe(self, who: str = "VMM") -> str:
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            return f"{who} killed by {name}"
        if self.code is not None:
            return f"{who} exited with code {self.code}"
        return f"{who} exited (exit code unknown: it was not started by this agent)"


def _reap(pid: int, child: subprocess.Popen[bytes] | None) -> ExitStatus:
    """Collect the exit status of our own child; a non-child's status is unknowable."""
    if child is None:
        return ExitStatus()
    try:
        wpid, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return ExitStatus(code=child.returncode) if child.returncode is not None else ExitStatus()
    if wpid == 0:
        # pidfd said it exited but the kernel has not finished; wait for it
        wpid, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        child.returncode = -os.WTERMSIG(status)
        return ExitStatus(signal=os.WTERMSIG(status))
    code = os.WEXITSTATUS(status)
    child.returncode = code
    return ExitStatus(code=code)


class ExitWatch:
    """Resolves a future the moment a process exits, using a pidfd in the event loop."""

    def __init__(self, pid: int, child: subprocess.Popen[bytes] | None = None) -> None:
        self.pid = pid
        self.child = child
        self._loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[ExitStatus] = self._loop.create_future()
        self._fd: int | None = None
        try:
            self._fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._finish()
            return
        self._loop.add_reader(self._fd, self._finish)

    def _finish(self) -> None:
        self._close_fd()
        if not self.exited.done():
            self.exited.set_result(_reap(self.pid, self.child))

    def _close_fd(self) -> None:
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None

    def cancel(self) -> None:
        """Stop watching without touching the process (the agent is shutting down)."""
        self._close_fd()
        if not self.exited.done():
            self.exited.cancel()


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def set_child_subreaper() -> None:
    """Reap orphaned grandchildren ourselves: a slow PID 1 makes their deaths look 2 s late."""
    import ctypes

    PR_SET_CHILD_SUBREAPER = 36
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
