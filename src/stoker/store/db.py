"""One SQLite connection with the durability settings stoker relies on.

WAL with ``synchronous=FULL`` so a committed state change survives a power cut, and
``BEGIN IMMEDIATE`` for writes so two writers never interleave a read-modify-write.
The connection is shared by the event loop and worker threads behind one lock.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


class SchemaTooNew(Exception):
    """The file was written by a newer stoker; refuse rather than corrupt it."""


def to_iso(dt: datetime) -> str:
    """UTC, fixed width, so text order is time order."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def from_iso(text: str | None) -> datetime | None:
    if text is None:
        return None
    return datetime.fromisoformat(text)  # C-fast; strptime dominated listing many rows


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


class Database:
    def __init__(self, path: Path | str, migrations: Sequence[str] | None = None) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        #: nesting of ``write`` on the thread that holds the lock
        self._depth = 0
        self.conn = sqlite3.connect(
            str(self.path), isolation_level=None, check_same_thread=False, timeout=10.0
        )
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        self.migrate(migrations)

    @staticmethod
    def _all_migrations() -> Sequence[str]:
        # imported here: the capability store modules that schema.py collects import this one
        from stoker.store.schema import MIGRATIONS

        return MIGRATIONS

    @property
    def version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self, migrations: Sequence[str] | None = None) -> None:
        """Apply every migration after the file's version, each in its own transaction."""
        if migrations is None:
            migrations = self._all_migrations()
        with self._lock:
            current = self.version
            if current > len(migrations):
                raise SchemaTooNew(
                    f"{self.path} has schema version {current}, newer than this stoker "
                    f"understands ({len(migrations)}); upgrade stoker"
                )
            for number in range(current + 1, len(migrations) + 1):
                self.conn.execute("BEGIN IMMEDIATE")
                try:
                    for statement in _statements(migrations[number - 1]):
                        self.conn.execute(statement)
                    self.conn.execute(f"PRAGMA user_version={number}")
                    self.conn.execute("COMMIT")
                except BaseException:
                    self.conn.execute("ROLLBACK")
                    raise

    @contextmanager
    def write(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """A write transaction: all of it or none of it.

        A ``write`` inside another on the same thread joins it, so writes that belong to one
        change (a state, its event, the VMM's record cleared) commit together: one fsync, and
        no moment where one is on disk without the others. Never await inside one.

        ``durable=False`` commits without waiting for the disk (WAL, ``synchronous=NORMAL``):
        the change survives an agent crash (it is in the log the moment it commits) but not
        a power cut until the next durable commit, whose fsync covers it. For what a later
        step of the same operation makes durable anyway (``stopping`` before ``stopped``) or
        what is derived and re-made on its own (a health verdict).
        """
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self.conn
                finally:
                    self._depth -= 1
                return
            if not durable:
                self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            else:
                self.conn.execute("COMMIT")
            finally:
                self._depth = 0
                if not durable:
                    self.conn.execute("PRAGMA synchronous=FULL")

    def query(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self.conn.execute(sql, params).fetchall()

    def query_one(
        self, sql: str, params: Sequence[Any] | dict[str, Any] = ()
    ) -> sqlite3.Row | None:
        with self._lock:
            row: sqlite3.Row | None = self.conn.execute(sql, params).fetchone()
            return row

    def close(self) -> None:
        with self._lock:
            self.conn.close()


def _statements(script: str) -> list[str]:
    """Split a migration into statements; executescript would commit behind our back."""
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            if buffer.strip():
                statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        statements.append(buffer.strip())
    return statements
