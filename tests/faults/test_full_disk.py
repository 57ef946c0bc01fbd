"""A disk that fills up in the middle of a snapshot or a restore: a clear error, the older
snapshots intact, nothing half-written left, the VM running (or its disks as they were).

The agent's data dir (with the image pool inside it) is on a small tmpfs the test mounts;
the disk is filled with ``fallocate`` at the worst moment: while a snapshot's memory is
saved and its disks not yet copied (the test agent ``tests.agents.slow_save`` holds that
moment), and while a restore copies a disk back.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from stoker.client import StokerError
from tests.agents.slow_save import COPY_DELAY_ENV, DELAY_ENV, HELD_MARKER
from tests.faults.chaos import half_snapshots
from tests.helpers import AgentProcess, free_port, guest_spec, http_get, wait_for

pytestmark = pytest.mark.integration

FS_MIB = 640


@pytest.fixture
def small_fs() -> Iterator[Path]:
    mount = Path(tempfile.mkdtemp(prefix="stkfull-", dir="/tmp"))
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={FS_MIB}m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        mount.rmdir()
        pytest.skip(f"mounting a tmpfs needs root (CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
        mount.rmdir()


def fill(path: Path) -> Path:
    """Take every free byte of ``path``'s file system (instantly, with fallocate)."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        size = os.fstat(fd).st_size
        chunk = os.statvfs(path).f_bavail * os.statvfs(path).f_frsize
        while chunk >= 4096:  # the space shrinks as the agent writes: take what is left
            try:
                os.posix_fallocate(fd, size, chunk)
                size += chunk
            except OSError:
                chunk //= 2
    finally:
        os.close(fd)
    return filler


def fill_when(path: Path, seen: str, ready: threading.Event) -> threading.Thread:
    """Fill ``path``'s file system the moment an entry named like ``seen`` (a glob) is
    created in ``path`` or in a directory created there: inotify wakes the filler within
    microseconds, well inside the copy it must interrupt."""
    watch_fd = _inotify_watch(path)

    def watch() -> None:
        try:
            while not next(path.glob(seen), None):
                os.read(watch_fd, 4096)  # blocks until something is created
                _inotify_watch(path, watch_fd)  # and watch the directories made meanwhile
            fill(path)
            ready.set()
        finally:
            os.close(watch_fd)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


IN_CREATE, IN_MOVED_TO, IN_CLOSE_WRITE = 0x100, 0x80, 0x8


def _inotify_watch(path: Path, fd: int | None = None) -> int:
    """An inotify descriptor (``fd``, or a new one) watching ``path`` and its
    subdirectories for new entries."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_CLOEXEC) if fd is None else fd
    if fd < 0:
        raise OSError(ctypes.get_errno(), "inotify_init1")
    for directory in [path, *(p for p in path.iterdir() if p.is_dir())]:
        mask = IN_CREATE | IN_MOVED_TO | IN_CLOSE_WRITE
        if libc.inotify_add_watch(fd, str(directory).encode(), mask) < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {directory}")
    return fd


def test_full_disk_during_snapshot_and_restore(small_fs: Path) -> None:
    data = small_fs / "d"
    data.mkdir(mode=0o700)
    agent = AgentProcess(
        data_dir=data,
        module="tests.agents.slow_save",
        env={DELAY_ENV: "1", COPY_DELAY_ENV: "1", "STOKER_SNAPSHOTS__MARGIN_MIB": "0"},
    ).start()
    try:
        disk = agent.images / "full.raw"
        with open(disk, "wb") as f:
            f.write(os.urandom(128 * 1024 * 1024))  # real data: a copy takes a moment
            f.truncate(160 * 1024 * 1024)
        port = free_port()
        spec = guest_spec("full", port, drives=[{"path": str(disk), "format": "raw"}])
        with agent.client() as api:
            vm = api.create_vm(spec)
            vm = api.start_vm("full", wait=True, timeout_s=90)
            assert vm.state == "running", vm.state_reason
            first = api.create_snapshot("full")

            # 1. the disk fills while the second snapshot's memory is saved, before its disk
            # copy: a clear error, the first snapshot intact, no half snapshot, VM running
            ready = threading.Event()
            vm_dir = data / "vms" / vm.id
            (vm_dir / HELD_MARKER).unlink()  # the first snapshot's
            filler = fill_when(vm_dir, HELD_MARKER, ready)
            with pytest.raises(StokerError) as failed:
                api.create_snapshot("full")
            filler.join(10)
            assert ready.is_set()
            assert failed.value.status == 409
            assert "No space left on device" in failed.value.detail, failed.value.detail
            assert [s.id for s in api.list_snapshots("full")] == [first.id]
            assert half_snapshots(data) == []
            assert api.get_vm("full").state == "running"
            assert wait_for(lambda: http_get(f"http://127.0.0.1:{port}/health"), 30)
            (vm_dir / "filler").unlink()
            verified = api.verify_snapshot(first.id)
            assert verified.last_verification and verified.last_verification.ok

            # 2. the disk fills while a restore copies the disk back: a clear error, the
            # VM's disk as it was, no copy left beside it, the snapshot intact
            before = disk.read_bytes()
            ready.clear()
            filler = fill_when(disk.parent, f".{disk.name}.stoker-restore-*", ready)
            with pytest.raises(StokerError) as failed:
                api.restore_snapshot(first.id)
            filler.join(10)
            assert ready.is_set()
            assert failed.value.status == 409 and failed.value.title == "Restore failed"
            assert "disks are unchanged" in failed.value.detail, failed.value.detail
            assert disk.read_bytes() == before
            assert sorted(p.name for p in disk.parent.iterdir()) == ["filler", "full.raw"]
            (disk.parent / "filler").unlink()
            verified = api.verify_snapshot(first.id)
            assert verified.last_verification and verified.last_verification.ok

            # 3. space freed: both work again
            api.restore_snapshot(first.id)
            assert api.get_vm("full").state == "running"
            assert api.create_snapshot("full").id != first.id
    finally:
        agent.cleanup()
