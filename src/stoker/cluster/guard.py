"""The fence guard: a small process per node that kills cluster VMMs when the agent's fence
deadline passes, even if the agent itself is dead, stalled or stopped.

VMMs outlive the agent by design (architecture invariant 2), so an agent that dies leaves
cluster VMs running while its lease runs out and the scheduler starts them elsewhere. The
guard closes that gap: the agent writes ``fence.json`` (the deadline, in CLOCK_MONOTONIC
seconds, which every process on the host shares, and the VMMs of its cluster VMs) after every
renewal; the guard reads it every 20 ms and, once the deadline has passed, SIGKILLs each
listed VMM (pid and start time must match) and any process whose command line carries a
listed VM's marker. A restarted agent resumes the same lease and keeps writing the file, so
the guard never notices the restart.

    python -m stoker.cluster.guard DIR      (started by the agent, in its own session)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from stoker.host.proc import is_same_live_process, read_cmdline

FENCE_FILE = "fence.json"
PID_FILE = "guard.pid"
POLL_S = 0.02


@dataclass
class FenceState:
    """What fence.json says: ``deadline`` None means "nothing to guard"."""

    deadline: float | None = None
    #: vm id -> (pid, start time) of its VMM, or None when it has none recorded
    vms: dict[str, tuple[int, int] | None] = field(default_factory=dict)
    #: the agent's data directory: VMMs run unconfined carry ``<data_dir>/vms/<id>``
    data_dir: str = ""
    exit: bool = False

    def to_json(self) -> str:
        return json.dumps(
            {
                "deadline": self.deadline,
                "vms": {k: list(v) if v else None for k, v in self.vms.items()},
                "data_dir": self.data_dir,
                "exit": self.exit,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> FenceState:
        raw = json.loads(text)
        vms: dict[str, tuple[int, int] | None] = {}
        for vm_id, proc in dict(raw.get("vms") or {}).items():
            vms[str(vm_id)] = (int(proc[0]), int(proc[1])) if proc else None
        deadline = raw.get("deadline")
        return cls(
            deadline=float(deadline) if deadline is not None else None,
            vms=vms,
            data_dir=str(raw.get("data_dir") or ""),
            exit=bool(raw.get("exit")),
        )


def write_state(directory: Path, state: FenceState) -> None:
    """Atomically (rename), so the guard never reads half a file."""
    tmp = directory / f".{FENCE_FILE}.{os.getpid()}"
    tmp.write_text(state.to_json())
    os.replace(tmp, directory / FENCE_FILE)


def read_state(directory: Path) -> FenceState | None:
    try:
        return FenceState.from_json((directory / FENCE_FILE).read_text())
    except (OSError, ValueError, TypeError, IndexError):
        return None


def markers(state: FenceState, vm_id: str) -> list[str]:
    found = [f"process=stoker-{vm_id}"]
    if state.data_dir:
        found.append(f"{state.data_dir.rstrip('/')}/vms/{vm_id}/")
    return found


def kill_cluster_vmms(state: FenceState) -> list[int]:
    """SIGKILL every VMM of the listed VMs; returns the pids signalled."""
    killed = []
    for proc in state.vms.values():
        if proc is not None and is_same_live_process(*proc):
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc[0], signal.SIGKILL)
                killed.append(proc[0])
    wanted = [m for vm_id in state.vms for m in markers(state, vm_id)]
    if wanted:
        me = os.getpid()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            line = " ".join(read_cmdline(int(entry.name)))
            if int(entry.name) not in killed and any(marker in line for marker in wanted):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry.name), signal.SIGKILL)
                    killed.append(int(entry.name))
    return killed


def run(directory: Path) -> None:
    """Watch ``directory/fence.json`` until it says exit (or disappears for good)."""
    fired_for: float | None = None
    missing_since: float | None = None
    while True:
        state = read_state(directory)
        now = time.monotonic()
        if state is None:
            missing_since = missing_since or now
            if not directory.exists() or now - missing_since > 60:
                return
        else:
            missing_since = None
            if state.exit:
                return
            due = state.deadline is not None and now >= state.deadline
            if due and state.vms and fired_for != state.deadline:
                killed = kill_cluster_vmms(state)
                print(f"fence guard: deadline passed; killed {killed}", flush=True)
                fired_for = state.deadline
        time.sleep(POLL_S)


# -- the agent's side --------------------------------------------------------------------------


def guard_running(directory: Path) -> int | None:
    """The pid of this directory's guard, if one runs."""
    try:
        pid = int((directory / PID_FILE).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    line = " ".join(read_cmdline(pid))
    return pid if "stoker.cluster.guard" in line and str(directory) in line else None


def ensure_guard(directory: Path) -> int:
    """Start the guard for ``directory`` unless one already runs (it survived an agent
    restart); returns its pid."""
    directory.mkdir(parents=True, exist_ok=True)
    running = guard_running(directory)
    if running is not None:
        return running
    with open(directory / "guard.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stoker.cluster.guard", str(directory)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )
    (directory / PID_FILE).write_text(f"{proc.pid}\n")
    return proc.pid


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m stoker.cluster.guard DIR", file=sys.stderr)
        return 2
    run(Path(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
