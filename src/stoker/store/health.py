"""Probe states and each VM's health verdict, kept so an agent restart keeps the history."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime
from typing import TYPE_CHECKING

from stoker.domain.health import Health, ProbeState, Result

SCHEMA = """
CREATE TABLE health_probes (
    vm_id TEXT NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    consecutive_successes INTEGER NOT NULL DEFAULT 0,
    last_message TEXT,
    last_error TEXT,
    last_at TEXT,
    last_ok_at TEXT,
    checks INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    history TEXT NOT NULL DEFAULT '[]',
    PRIMARY KEY (vm_id, name)
);
CREATE TABLE health_vms (
    vm_id TEXT PRIMARY KEY,
    health TEXT NOT NULL,
    since TEXT NOT NULL,
    reason TEXT
);
"""

# schema.py imports this module for SCHEMA while db.py is still loading: reach db lazily
from stoker.store import db as _db  # noqa: E402

if TYPE_CHECKING:
    from stoker.store.db import Database


class HealthStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def save_probe(self, vm_id: str, probe: ProbeState) -> None:
        history = [
            {"ok": r.ok, "message": r.message, "at": _db.to_iso(r.at), "duration_s": r.duration_s}
            for r in probe.history
        ]
        with self.db.write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO health_probes (vm_id, name, kind, status,"
                " consecutive_failures, consecutive_successes, last_message, last_error,"
                " last_at, last_ok_at, checks, failures, history)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    vm_id,
                    probe.name,
                    probe.kind,
                    probe.status.value,
                    probe.consecutive_failures,
                    probe.consecutive_successes,
                    probe.last_message,
                    probe.last_error,
                    _db.to_iso(probe.last_at) if probe.last_at else None,
                    _db.to_iso(probe.last_ok_at) if probe.last_ok_at else None,
                    probe.checks,
                    probe.failures,
                    _db.dumps(history),
                ),
            )

    def probes(self, vm_id: str) -> list[ProbeState]:
        rows = self.db.query("SELECT * FROM health_probes WHERE vm_id = ? ORDER BY rowid", (vm_id,))
        return [_probe(r) for r in rows]

    def drop_probes_except(self, vm_id: str, names: list[str]) -> None:
        """Forget probes the spec no longer has."""
        marks = ",".join("?" * len(names))
        with self.db.write() as conn:
            conn.execute(
                f"DELETE FROM health_probes WHERE vm_id = ? AND name NOT IN ({marks})",
                (vm_id, *names),
            )

    def set_verdict(self, vm_id: str, health: Health, since: datetime, reason: str) -> None:
        with self.db.write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO health_vms (vm_id, health, since, reason)"
                " VALUES (?, ?, ?, ?)",
                (vm_id, health.value, _db.to_iso(since), reason),
            )

    def verdict(self, vm_id: str) -> tuple[Health, datetime, str | None] | None:
        row = self.db.query_one("SELECT * FROM health_vms WHERE vm_id = ?", (vm_id,))
        if row is None:
            return None
        return Health(row["health"]), _db.from_iso(row["since"]), row["reason"]  # type: ignore[return-value]

    def delete(self, vm_id: str) -> None:
        with self.db.write() as conn:
            conn.execute("DELETE FROM health_probes WHERE vm_id = ?", (vm_id,))
            conn.execute("DELETE FROM health_vms WHERE vm_id = ?", (vm_id,))


def _probe(row: sqlite3.Row) -> ProbeState:
    history = tuple(
        Result(
            ok=bool(h["ok"]),
            message=str(h["message"]),
            at=_db.from_iso(h["at"]),  # type: ignore[arg-type]
            duration_s=float(h.get("duration_s", 0.0)),
        )
        for h in json.loads(row["history"])
    )
    return ProbeState(
        name=row["name"],
        kind=row["kind"],
        status=Health(row["status"]),
        consecutive_failures=row["consecutive_failures"],
        consecutive_successes=row["consecutive_successes"],
        last_message=row["last_message"],
        last_error=row["last_error"],
        last_at=_db.from_iso(row["last_at"]),
        last_ok_at=_db.from_iso(row["last_ok_at"]),
        checks=row["checks"],
        failures=row["failures"],
        history=history,
    )
