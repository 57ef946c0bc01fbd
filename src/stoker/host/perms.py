"""The data dir is the agent's alone: 0700, its files 0600.

The agent runs with umask 077, so what it creates is private from the start; at start it
also checks what is already there (a data dir made by an older stoker, a restored backup, a
copied file) and *fixes* group and other permission bits, logging each path it fixed. It
*refuses* a data dir owned by another user: whoever owns it controls the agent's files.
One exception: search (``x``) bits on the data dir itself are left as the operator set them
(a helper that drops privileges, like a managed network's dnsmasq, may need to pass through
it to its own directory); without read bits nobody else can list it, and everything in it
is private.

Only the agent's own places are walked: the data dir itself, its database, lock, backups,
reports and kept snapshots, ``vms/`` and each VM's ``snapshots/``. A VM's runtime files
belong to its VMM (its own uid under confinement) and are left to the confinement code.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

AGENT_UMASK = 0o077

#: entries of the data dir the agent owns, walked whole (directories) or checked (files)
PRIVATE_TREES = ("backups", "reports", "kept-snapshots")
PRIVATE_FILES = ("stoker.db", "stoker.db-wal", "stoker.db-shm", "agent.lock")


class DataDirNotOurs(Exception):
    """The data dir belongs to another user."""


def make_private_data_dir(data_dir: Path) -> list[Path]:
    """Create ``data_dir`` (0700) if needed, refuse one owned by another user, and take
    group and other bits off everything the agent owns in it; returns the paths fixed."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.stat(data_dir)
    if st.st_uid != os.geteuid():
        raise DataDirNotOurs(
            f"data_dir {data_dir} is owned by uid {st.st_uid}, not by the agent's uid "
            f"{os.geteuid()}: whoever owns it controls the agent's files; "
            f"`chown -R {os.geteuid()} {data_dir}` if it is yours"
        )
    fixed = [data_dir] if _make_private(data_dir, keep=0o011) else []
    for path in _agent_paths(data_dir):
        if _make_private(path):
            fixed.append(path)
    return fixed


def _agent_paths(data_dir: Path) -> Iterator[Path]:
    for name in PRIVATE_FILES:
        yield data_dir / name
    for name in PRIVATE_TREES:
        yield from _walk(data_dir / name)
    vms = data_dir / "vms"
    yield vms
    if vms.is_dir():
        for vm_dir in vms.iterdir():
            yield from _walk(vm_dir / "snapshots")


def _walk(root: Path) -> Iterator[Path]:
    if not root.is_dir() or root.is_symlink():
        if root.exists():
            yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        yield Path(dirpath)
        for name in (*filenames, *dirnames):
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_dir():
                yield path


def _make_private(path: Path, keep: int = 0) -> bool:
    """Take group and other bits (but ``keep``) off ``path``, never through a symlink;
    True if it changed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    extra = st.st_mode & 0o077 & ~keep
    if stat.S_ISLNK(st.st_mode) or stat.S_ISSOCK(st.st_mode) or not extra:
        return False
    os.chmod(path, stat.S_IMODE(st.st_mode) & ~extra, follow_symlinks=False)
    return True
