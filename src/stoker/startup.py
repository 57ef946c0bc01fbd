"""What the agent checks before it opens anything in its data dir.

In this order, each failure one clear line (``StartRefused``):

1. umask 077, then the data dir made private (0700, files 0600; group and other bits on the
   agent's own files are fixed and logged; a data dir owned by another user is refused);
2. the data dir's lock: one agent per data dir, the second is refused naming the first's
   pid, before it touches the socket or the database;
3. the database: ``PRAGMA quick_check``; a damaged one is refused naming the file and the
   latest backup; an empty or missing one beside existing VM directories is refused unless
   ``[database] allow_empty_with_vm_dirs`` says to start empty anyway.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from stoker.config import AgentConfig
from stoker.host import lockfile, perms
from stoker.services.backups import DatabaseConfig
from stoker.store import backup

log = logging.getLogger("stoker.agent")


class StartRefused(Exception):
    """The agent must not start; the message is one line saying what to do."""


def prepare_data_dir(config: AgentConfig, database: DatabaseConfig) -> lockfile.DataDirLock:
    """Make the data dir private, take its lock, check the database; the caller releases
    the lock when the agent exits."""
    os.umask(perms.AGENT_UMASK)
    try:
        fixed = perms.make_private_data_dir(config.data_dir)
    except perms.DataDirNotOurs as exc:
        raise StartRefused(str(exc)) from None
    for path in fixed:
        log.warning("fixed permissions of %s: group and others had access; now owner only", path)
    try:
        lock = lockfile.acquire(config.data_dir)
    except lockfile.AlreadyLocked as exc:
        raise StartRefused(str(exc)) from None
    try:
        check_database(config.db_path, config.data_dir, database)
    except BaseException:
        lock.release()
        raise
    return lock


def check_database(db_path: Path, data_dir: Path, database: DatabaseConfig) -> None:
    found = backup.inspect(db_path)
    latest = backup.latest_backup(data_dir)
    restore_hint = (
        f"restore the latest backup with `stoker db restore {latest}` (it keeps the "
        "replaced file aside)"
        if latest is not None
        else "no backup exists under backups/"
    )
    if found.state == "damaged":
        raise StartRefused(f"database {db_path} is damaged ({found.problem}); {restore_hint}")
    if found.state in ("missing", "empty"):
        vm_dirs = _vm_dirs(data_dir)
        if vm_dirs and not database.allow_empty_with_vm_dirs:
            raise StartRefused(
                f"database {db_path} is {found.state} but {data_dir / 'vms'} holds "
                f"{len(vm_dirs)} VM director{'y' if len(vm_dirs) == 1 else 'ies'}: their "
                f"records would be lost; {restore_hint}, or start empty on purpose with "
                "[database] allow_empty_with_vm_dirs = true "
                "(STOKER_DATABASE__ALLOW_EMPTY_WITH_VM_DIRS=1)"
            )


def _vm_dirs(data_dir: Path) -> list[Path]:
    vms = data_dir / "vms"
    if not vms.is_dir():
        return []
    return [d for d in vms.iterdir() if d.is_dir() and not d.name.startswith(".")]
