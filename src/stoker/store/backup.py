"""The database file itself: integrity check, online backups, restore.

Backups are SQLite's own online backup (``Connection.backup``) from a separate read-only
connection, taken in one step so the copy is one consistent snapshot even while the agent
writes; each is written under a temporary name, fsynced and renamed, so a crash never leaves
half a backup with a backup's name. A restore replaces the database only when the agent is
stopped (the caller holds the data dir's lock), atomically, and keeps the replaced file
(and its WAL) aside rather than deleting it.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

BACKUP_DIR = "backups"
_PREFIX = "stoker-"
_SUFFIX = ".db"
_JOURNALS = ("-wal", "-shm")


class DatabaseDamaged(Exception):
    """The file is not a sound SQLite database; the message is one line."""


@dataclass(frozen=True)
class Inspection:
    """What is in a database file: ``missing``, ``empty`` (no stoker tables), ``ok`` or
    ``damaged`` (``problem`` says how), and how many VMs it records."""

    state: str
    problem: str | None = None
    vms: int = 0


def inspect(path: Path) -> Inspection:
    """Open ``path`` read-only (never creating it) and run ``PRAGMA quick_check``."""
    if not path.exists():
        return Inspection("missing")
    if path.stat().st_size == 0:
        return Inspection("empty")
    try:
        # read-write (it only reads): a read-only connection cannot recreate the -shm file a
        # crash may have left missing, and would call a sound WAL database unreadable
        conn = sqlite3.connect(str(path), timeout=10.0)
    except sqlite3.Error as exc:
        return Inspection("damaged", str(exc))
    try:
        rows = conn.execute("PRAGMA quick_check").fetchall()
        problems = [str(r[0]) for r in rows if r[0] != "ok"]
        if problems:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            return Inspection("damaged", problems[0] + more)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "vms" not in tables:
            return Inspection("empty")
        count = int(conn.execute("SELECT COUNT(*) FROM vms").fetchone()[0])
        return Inspection("ok", vms=count)
    except sqlite3.Error as exc:  # "file is not a database", "database disk image is malformed"
        return Inspection("damaged", str(exc))
    finally:
        conn.close()


def backups(data_dir: Path) -> list[Path]:
    """The data dir's backups, newest first."""
    folder = data_dir / BACKUP_DIR
    if not folder.is_dir():
        return []
    found = [
        p
        for p in folder.iterdir()
        if p.name.startswith(_PREFIX) and p.name.endswith(_SUFFIX) and p.is_file()
    ]
    return sorted(found, key=lambda p: p.name, reverse=True)


def latest_backup(data_dir: Path) -> Path | None:
    found = backups(data_dir)
    return found[0] if found else None


def backup_name(at: datetime) -> str:
    """Sortable by time: ``stoker-20261130-064500-123456.db`` (UTC)."""
    return f"{_PREFIX}{at.astimezone(UTC):%Y%m%d-%H%M%S-%f}{_SUFFIX}"


def take_backup(db_path: Path, data_dir: Path, keep: int, at: datetime | None = None) -> Path:
    """Copy the live database into ``<data_dir>/backups/`` and keep only the newest
    ``keep`` backups; returns the new backup's path. Safe while the agent writes."""
    folder = data_dir / BACKUP_DIR
    folder.mkdir(mode=0o700, exist_ok=True)
    for stale in folder.glob(f".{_PREFIX}*{_SUFFIX}.tmp"):  # a backup a crash interrupted
        stale.unlink(missing_ok=True)
    target = folder / backup_name(at or datetime.now(UTC))
    copy_database(db_path, target)
    for old in backups(data_dir)[keep:]:
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
    return target


def copy_database(source: Path, target: Path) -> None:
    """One consistent copy of ``source`` at ``target`` (a temporary name, fsynced, renamed)."""
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    src = sqlite3.connect(str(source), timeout=10.0)
    try:
        dst = sqlite3.connect(str(tmp))
        try:
            src.backup(dst)  # one step: a single read transaction, one snapshot
            dst.execute("PRAGMA journal_mode=DELETE")  # a self-contained file, no WAL beside it
        finally:
            dst.close()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        src.close()
    os.chmod(tmp, 0o600)
    _fsync(tmp)
    os.replace(tmp, target)
    _fsync(target.parent)


def restore(backup: Path, db_path: Path, at: datetime | None = None) -> Path | None:
    """Replace ``db_path`` with ``backup`` (checked first); the replaced database and its
    journals are renamed aside with a ``.replaced-<time>`` suffix. Returns that path (None
    when there was no database). The agent must be stopped: the caller holds its lock."""
    found = inspect(backup)
    if found.state != "ok":
        raise DatabaseDamaged(
            f"{backup} is not a usable stoker database ({found.problem or found.state})"
        )
    staged = db_path.with_name(f".{db_path.name}.restoring")
    copy_database(backup, staged)
    stamp = (at or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%d-%H%M%S")
    aside = db_path.with_name(f"{db_path.name}.replaced-{stamp}")
    moved = None
    if db_path.exists():
        os.rename(db_path, aside)
        moved = aside
    for journal in _JOURNALS:
        current = db_path.with_name(db_path.name + journal)
        if current.exists():
            os.rename(current, aside.with_name(aside.name + journal))
    os.rename(staged, db_path)
    _fsync(db_path.parent)
    return moved


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
