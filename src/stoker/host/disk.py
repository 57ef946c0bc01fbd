"""Disk space, sizes, block devices and crash-safe writes for VM images and state files."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes available to an unprivileged writer (f_bavail), the space a VM image can use."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def dir_size(path: str | os.PathLike[str]) -> int:
    """Allocated bytes under ``path`` (st_blocks, so sparse images count what they use),
    each hard-linked file once; symlinks are not followed; files vanishing mid-walk are skipped."""
    root = Path(path)
    top = os.stat(root, follow_symlinks=False)  # FileNotFoundError for a missing path
    total = top.st_blocks * 512
    if not root.is_dir() or root.is_symlink():
        return total
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except (FileNotFoundError, NotADirectoryError):
            continue  # removed while we walked
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def device_of(path: str | os.PathLike[str], sys_block: Path = Path("/sys/dev/block")) -> str:
    """'MAJ:MIN' of the whole disk holding ``path``, as cgroup io.max / blkio want it.

    A partition is mapped to its disk because io.max accepts whole devices only. Files on
    tmpfs or overlayfs have no block device (major 0): that is an error, not "0:NN".
    """
    st = os.stat(path)
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    if major == 0:
        raise ValueError(f"{path} is on a filesystem without a block device (dev 0:{minor})")
    node = sys_block / f"{major}:{minor}"
    if (node / "partition").exists():
        return (node.resolve().parent / "dev").read_text().strip()
    return f"{major}:{minor}"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` so a crash leaves the old or the new content, never a torn file:
    temp file in the same directory, fsync, rename over, fsync the directory."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def atomic_write_text(
    path: str | os.PathLike[str], text: str, encoding: str = "utf-8", mode: int = 0o644
) -> None:
    atomic_write_bytes(path, text.encode(encoding), mode)
