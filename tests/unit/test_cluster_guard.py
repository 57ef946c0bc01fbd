"""The fence guard process: kills cluster VMMs once the deadline passes, not before."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from stoker.cluster.guard import FenceState, guard_running, read_state, write_state
from stoker.host.proc import read_start_time
from tests.helpers import pid_alive, short_tmpdir, wait_for


def _fake_vmm(vm_id: str) -> subprocess.Popen[bytes]:
    """A process whose command line carries a VMM's marker, as QEMU's ``-name`` does."""
    return subprocess.Popen(
        ["sh", "-c", "sleep 60", f"guest=stoker-web,process=stoker-{vm_id}"],
        start_new_session=True,
    )


def test_the_state_file_round_trips(tmp_path: Path) -> None:
    state = FenceState(deadline=12.5, vms={"a": (10, 20), "b": None}, data_dir="/d")
    write_state(tmp_path, state)
    assert read_state(tmp_path) == state


def test_the_guard_kills_listed_vmms_only_after_the_deadline() -> None:
    work = short_tmpdir("stk-guard-")
    recorded, unrecorded, bystander = _fake_vmm("aaaa"), _fake_vmm("bbbb"), _fake_vmm("cccc")
    guard = subprocess.Popen([sys.executable, "-m", "stoker.cluster.guard", str(work)])
    try:
        start = read_start_time(recorded.pid)
        assert start is not None
        vms: dict[str, tuple[int, int] | None] = {"aaaa": (recorded.pid, start), "bbbb": None}
        write_state(work, FenceState(deadline=time.monotonic() + 0.5, vms=vms))
        time.sleep(0.25)
        assert all(pid_alive(p.pid) for p in (recorded, unrecorded, bystander))
        killed_by = time.monotonic() + 0.25 + 2.0
        wait_for(lambda: recorded.poll() is not None and unrecorded.poll() is not None, 3.0)
        assert time.monotonic() < killed_by
        assert bystander.poll() is None  # not a listed VM
        write_state(work, FenceState(exit=True))
        assert guard.wait(timeout=5) == 0
    finally:
        for proc in (recorded, unrecorded, bystander, guard):
            proc.kill()
            proc.wait()
        subprocess.run(["rm", "-rf", str(work)], check=False)


def test_guard_running_recognises_only_its_own_directory(tmp_path: Path) -> None:
    assert guard_running(tmp_path) is None
    other = subprocess.Popen(["sleep", "5"])
    try:
        (tmp_path / "guard.pid").write_text(f"{other.pid}\n")
        assert guard_running(tmp_path) is None  # a live pid, but not a guard of this dir
    finally:
        other.kill()
        other.wait()
