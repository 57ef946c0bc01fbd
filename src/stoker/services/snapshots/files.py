"""Blocking file work that must survive a crash: copies, fsyncs, atomic JSON, tool runs.

Kept apart from the snapshot logic because every caller runs these in a thread
(``asyncio.to_thread``) and because "durable" has one definition here: data fsynced, then
renamed, then the directory fsynced.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any


def run_tool(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a host tool (cp, qemu-img) with its output captured as text."""
    return subprocess.run(argv, capture_output=True, text=True)


def fsync_path(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def copy_file(src: Path, dst: Path) -> None:
    """Copy an image, sharing blocks where the file system can and keeping holes."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    done = run_tool(["cp", "--reflink=auto", "--sparse=always", "--", str(src), str(dst)])
    if done.returncode != 0:
        raise OSError(f"copying {src} failed: {done.stderr.strip() or done.returncode}")


class UnsafeDirectory(OSError):
    """A directory others can write to: a file created there could be swapped or raced."""


def open_private_dir(path: Path) -> int:
    """A descriptor of ``path``, a directory only this process's user can write to (owned by
    it, not group- or world-writable); UnsafeDirectory otherwise. Files are then created
    relative to the descriptor, so a rename of a parent on the way changes nothing."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        os.close(fd)
        raise UnsafeDirectory(
            f"{path} can be written by other users (owner uid {st.st_uid}, mode "
            f"{st.st_mode & 0o7777:04o}); stoker writes restored disks only into directories "
            f"only it can write: `chown {os.geteuid()} {path}; chmod go-w {path}`"
        )
    return fd


def copy_into_new(src: Path, dir_fd: int, name: str) -> None:
    """Copy ``src`` to a new file ``name`` in the directory ``dir_fd``: created with
    ``O_EXCL | O_NOFOLLOW`` (an existing file or a planted symlink fails, never followed),
    mode 0600, data fsynced; sparse and reflinked where the file system can."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
    try:
        done = subprocess.run(
            ["cp", "--reflink=auto", "--sparse=always", "--", str(src), f"/dev/fd/{fd}"],
            pass_fds=(fd,),
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise OSError(f"copying {src} failed: {done.stderr.strip() or done.returncode}")
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)
        raise
    os.close(fd)


def write_json_durably(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def allocated_bytes(path: Path) -> int:
    """Blocks actually used (a sparse image costs what it holds, not its length)."""
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0
