"""Schedules and their runs.

A run row in state ``running`` is the lock that keeps two runs of one schedule apart: a
partial unique index allows one such row per schedule, so a second claim fails inside the
same transaction that would have started it, even across tasks. Claiming a cron fire also
moves the schedule's ``last_fire_at`` forward in that transaction, so a fire is handled
once, whether it ran, was missed or was skipped.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import fields
from datetime import datetime
from typing import TYPE_CHECKING, Any

from stoker.domain.schedules import RunRecord, ScheduleRecord

# the module, not its names: schema.py imports this file while db.py is still loading
from stoker.store import db as _db

if TYPE_CHECKING:
    from stoker.store.db import Database

SCHEMA = """
CREATE TABLE schedules (
    id TEXT PRIMARY KEY,
    name TEXT UNIQUE,
    action TEXT NOT NULL,
    vm TEXT,
    selector TEXT,
    cron TEXT NOT NULL,
    tz TEXT NOT NULL,
    spread_s REAL NOT NULL DEFAULT 0,
    grace_s REAL NOT NULL DEFAULT 600,
    options TEXT NOT NULL DEFAULT '{}',
    enabled INTEGER NOT NULL DEFAULT 1,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    last_fire_at TEXT NOT NULL
);
CREATE TABLE schedule_runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    schedule_id TEXT NOT NULL,
    trigger TEXT NOT NULL,
    fire_at TEXT,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    status TEXT NOT NULL,
    message TEXT NOT NULL DEFAULT '',
    results TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX schedule_runs_by_schedule ON schedule_runs (schedule_id, id);
CREATE INDEX schedule_runs_by_time ON schedule_runs (started_at);
CREATE UNIQUE INDEX schedule_runs_one_running ON schedule_runs (schedule_id)
    WHERE status = 'running';
"""

RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
MISSED = "missed"
SKIPPED = "skipped"
FINISHED_STATUSES = (SUCCEEDED, FAILED, MISSED, SKIPPED)
MISSED_MESSAGE = "the agent was not running at the fire time and the grace window had passed"


#: every column but the identity and the timestamps the store keeps itself
UPDATABLE_COLUMNS = {f.name for f in fields(ScheduleRecord)} - {"id", "created_at", "updated_at"}


class AlreadyRunning(Exception):
    """The schedule has a run in progress; the caller decides whether that is an error."""


#: runs kept per schedule (the oldest finished ones go); ``[history] runs_per_schedule``
DEFAULT_MAX_RUNS = 1000


class ScheduleStore:
    def __init__(self, db: Database, max_runs: int = DEFAULT_MAX_RUNS) -> None:
        self.db = db
        self.max_runs = max_runs

    def _bound(self, conn: sqlite3.Connection, schedule_id: str) -> None:
        """Bounded history: finished runs beyond the newest ``max_runs`` go."""
        conn.execute(
            "DELETE FROM schedule_runs WHERE schedule_id = ? AND status != ? AND id <= (SELECT id"
            " FROM schedule_runs WHERE schedule_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (schedule_id, RUNNING, schedule_id, self.max_runs),
        )

    # ------------------------------------------------------------------------- schedules

    def insert(self, row: ScheduleRecord) -> None:
        """Raise ``sqlite3.IntegrityError`` when the name is taken."""
        with self.db.write() as conn:
            conn.execute(
                "INSERT INTO schedules (id, name, action, vm, selector, cron, tz, spread_s,"
                " grace_s, options, enabled, created_at, updated_at, last_fire_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    row.id,
                    row.name,
                    row.action,
                    row.vm,
                    _db.dumps(row.selector) if row.selector is not None else None,
                    row.cron,
                    row.tz,
                    row.spread_s,
                    row.grace_s,
                    _db.dumps(row.options),
                    int(row.enabled),
                    _db.to_iso(row.created_at),
                    _db.to_iso(row.updated_at),
                    _db.to_iso(row.last_fire_at),
                ),
            )

    def get(self, ref: str) -> ScheduleRecord | None:
        """By id, else by name."""
        row = self.db.query_one("SELECT * FROM schedules WHERE id = ?", (ref,))
        row = row or self.db.query_one("SELECT * FROM schedules WHERE name = ?", (ref,))
        return _schedule(row) if row is not None else None

    def all(self, enabled: bool | None = None) -> list[ScheduleRecord]:
        if enabled is None:
            rows = self.db.query("SELECT * FROM schedules ORDER BY created_at, id")
        else:
            rows = self.db.query(
                "SELECT * FROM schedules WHERE enabled = ? ORDER BY created_at, id",
                (int(enabled),),
            )
        return [_schedule(r) for r in rows]

    def update(self, schedule_id: str, at: datetime, **changes: Any) -> None:
        """Change the given columns (values in Python form) and ``updated_at``."""
        unknown = set(changes) - UPDATABLE_COLUMNS
        if unknown:
            raise ValueError(f"not schedule columns: {sorted(unknown)}")
        values: dict[str, Any] = {}
        for key, value in changes.items():
            if key in ("selector", "options"):
                value = _db.dumps(value) if value is not None else None
            elif key == "enabled":
                value = int(bool(value))
            elif key == "last_fire_at":
                value = _db.to_iso(value)
            values[key] = value
        values["updated_at"] = _db.to_iso(at)
        assignments = ", ".join(f"{key} = :{key}" for key in values)
        with self.db.write() as conn:
            conn.execute(
                f"UPDATE schedules SET {assignments} WHERE id = :id", {**values, "id": schedule_id}
            )

    def delete(self, schedule_id: str) -> None:
        with self.db.write() as conn:
            conn.execute("DELETE FROM schedule_runs WHERE schedule_id = ?", (schedule_id,))
            conn.execute("DELETE FROM schedules WHERE id = ?", (schedule_id,))

    # ------------------------------------------------------------------------------ runs

    def claim(
        self,
        schedule_id: str,
        trigger: str,
        at: datetime,
        fire_at: datetime | None = None,
        missed: list[datetime] | None = None,
    ) -> RunRecord:
        """Start a run (the lock), record ``missed`` fires, advance ``last_fire_at``.

        All in one transaction. Raises ``AlreadyRunning`` (and changes nothing) when a run of
        this schedule is in progress.
        """
        missed = missed or []
        try:
            with self.db.write() as conn:
                _insert_missed(conn, schedule_id, missed, at)
                cur = conn.execute(
                    "INSERT INTO schedule_runs (schedule_id, trigger, fire_at, started_at, status)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (schedule_id, trigger, _iso(fire_at), _db.to_iso(at), RUNNING),
                )
                run_id = int(cur.lastrowid or 0)
                _advance(conn, schedule_id, [fire_at, *missed])
                self._bound(conn, schedule_id)
        except sqlite3.IntegrityError:
            raise AlreadyRunning(schedule_id) from None
        run = self.run(run_id)
        assert run is not None
        return run

    def record(
        self,
        schedule_id: str,
        status: str,
        at: datetime,
        message: str,
        fire_at: datetime | None = None,
        missed: list[datetime] | None = None,
        trigger: str = "cron",
    ) -> None:
        """A fire that did not run (skipped: a run was in progress), plus missed fires."""
        missed = missed or []
        with self.db.write() as conn:
            _insert_missed(conn, schedule_id, missed, at)
            _insert_finished(conn, schedule_id, trigger, fire_at, at, status, message)
            _advance(conn, schedule_id, [fire_at, *missed])
            self._bound(conn, schedule_id)

    def record_missed(self, schedule_id: str, missed: list[datetime], at: datetime) -> None:
        with self.db.write() as conn:
            _insert_missed(conn, schedule_id, missed, at)
            _advance(conn, schedule_id, list(missed))
            self._bound(conn, schedule_id)

    def finish(
        self, run_id: int, status: str, at: datetime, message: str, results: list[dict[str, Any]]
    ) -> None:
        """End a run (releasing the lock) with its outcome."""
        if status not in FINISHED_STATUSES:
            raise ValueError(f"{status!r} is not a finished status")
        with self.db.write() as conn:
            conn.execute(
                "UPDATE schedule_runs SET status = ?, finished_at = ?, message = ?, results = ?"
                " WHERE id = ? AND status = ?",
                (status, _db.to_iso(at), message, _db.dumps(results), run_id, RUNNING),
            )

    def fail_interrupted(self, at: datetime, message: str) -> int:
        """Runs left ``running`` by an agent that died: failed, so their locks are released."""
        with self.db.write() as conn:
            cur = conn.execute(
                "UPDATE schedule_runs SET status = ?, finished_at = ?, message = ?"
                " WHERE status = ?",
                (FAILED, _db.to_iso(at), message, RUNNING),
            )
            return cur.rowcount

    def run(self, run_id: int) -> RunRecord | None:
        row = self.db.query_one("SELECT * FROM schedule_runs WHERE id = ?", (run_id,))
        return _run(row) if row is not None else None

    def running(self, schedule_id: str) -> RunRecord | None:
        row = self.db.query_one(
            "SELECT * FROM schedule_runs WHERE schedule_id = ? AND status = ?",
            (schedule_id, RUNNING),
        )
        return _run(row) if row is not None else None

    def runs(self, schedule_id: str | None = None, limit: int = 50) -> list[RunRecord]:
        """Newest first."""
        if schedule_id is None:
            rows = self.db.query("SELECT * FROM schedule_runs ORDER BY id DESC LIMIT ?", (limit,))
        else:
            rows = self.db.query(
                "SELECT * FROM schedule_runs WHERE schedule_id = ? ORDER BY id DESC LIMIT ?",
                (schedule_id, limit),
            )
        return [_run(r) for r in rows]

    def runs_between(self, start: datetime, end: datetime) -> list[RunRecord]:
        """Runs started in ``[start, end)``, oldest first (for reports)."""
        rows = self.db.query(
            "SELECT * FROM schedule_runs WHERE started_at >= ? AND started_at < ? ORDER BY id",
            (_db.to_iso(start), _db.to_iso(end)),
        )
        return [_run(r) for r in rows]


def _insert_finished(
    conn: sqlite3.Connection,
    schedule_id: str,
    trigger: str,
    fire_at: datetime | None,
    at: datetime,
    status: str,
    message: str,
) -> None:
    """A run row that ended as it was written (missed or skipped): it never held the lock."""
    conn.execute(
        "INSERT INTO schedule_runs (schedule_id, trigger, fire_at, started_at,"
        " finished_at, status, message) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (schedule_id, trigger, _iso(fire_at), _db.to_iso(at), _db.to_iso(at), status, message),
    )


def _insert_missed(
    conn: sqlite3.Connection, schedule_id: str, missed: list[datetime], at: datetime
) -> None:
    for fire in missed:
        _insert_finished(conn, schedule_id, "cron", fire, at, MISSED, MISSED_MESSAGE)


def _advance(conn: sqlite3.Connection, schedule_id: str, fires: Sequence[datetime | None]) -> None:
    """Move last_fire_at forward to the latest of ``fires``, never back: a late writer
    never re-opens handled fires."""
    fire = max([t for t in fires if t is not None], default=None)
    if fire is None:
        return
    conn.execute(
        "UPDATE schedules SET last_fire_at = ? WHERE id = ? AND last_fire_at < ?",
        (_db.to_iso(fire), schedule_id, _db.to_iso(fire)),
    )


def _iso(dt: datetime | None) -> str | None:
    return _db.to_iso(dt) if dt is not None else None


def _schedule(row: sqlite3.Row) -> ScheduleRecord:
    return ScheduleRecord(
        id=row["id"],
        name=row["name"],
        action=row["action"],
        vm=row["vm"],
        selector=json.loads(row["selector"]) if row["selector"] else None,
        cron=row["cron"],
        tz=row["tz"],
        spread_s=float(row["spread_s"]),
        grace_s=float(row["grace_s"]),
        options=json.loads(row["options"]),
        enabled=bool(row["enabled"]),
        created_at=_db.from_iso(row["created_at"]),  # type: ignore[arg-type]
        updated_at=_db.from_iso(row["updated_at"]),  # type: ignore[arg-type]
        last_fire_at=_db.from_iso(row["last_fire_at"]),  # type: ignore[arg-type]
    )


def _run(row: sqlite3.Row) -> RunRecord:
    return RunRecord(
        id=int(row["id"]),
        schedule_id=row["schedule_id"],
        trigger=row["trigger"],
        fire_at=_db.from_iso(row["fire_at"]),
        started_at=_db.from_iso(row["started_at"]),  # type: ignore[arg-type]
        finished_at=_db.from_iso(row["finished_at"]),
        status=row["status"],
        message=row["message"],
        results=json.loads(row["results"]),
    )
