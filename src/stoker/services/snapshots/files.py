"""Blocking file work that must survive a crash: copies, fsyncs, atomic JSON, tool runs.

Kept apart from the snapshot logic because every caller runs these in a thread
(``asyncio.to_thread``) and because "durable" has one definition here: data fsynced, then
renamed, then the directory fsynced.
"""

from __future__ import annotations

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
