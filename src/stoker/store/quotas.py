"""Per-VM quota overrides and quota-violation counters."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime
from typing import Any

from stoker.domain.quota import ViolationCount
from stoker.store.db import Database, dumps, from_iso, to_iso

SCHEMA = """
CREATE TABLE vm_quotas (
    vm_id TEXT PRIMARY KEY,
    quota TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE quota_violations (
    vm_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    episodes INTEGER NOT NULL DEFAULT 0,
    samples INTEGER NOT NULL DEFAULT 0,
    total REAL NOT NULL DEFAULT 0,
    first_at TEXT NOT NULL,
    last_at TEXT NOT NULL,
    last_detail TEXT NOT NULL,
    PRIMARY KEY (vm_id, kind)
);
"""


def _quota(text: str) -> dict[str, Any]:
    return dict(json.loads(text))


class QuotaStore:
    """Overrides are stored as the JSON of the fields set; counters are one row per VM and kind."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def get(self, vm_id: str) -> dict[str, Any] | None:
        row = self.db.query_one("SELECT quota FROM vm_quotas WHERE vm_id = ?", (vm_id,))
        return None if row is None else _quota(row["quota"])

    def all(self) -> dict[str, dict[str, Any]]:
        rows = self.db.query("SELECT vm_id, quota FROM vm_quotas")
        return {r["vm_id"]: _quota(r["quota"]) for r in rows}

    def put(self, vm_id: str, quota: dict[str, Any], at: datetime) -> None:
        with self.db.write() as conn:
            conn.execute(
                "INSERT INTO vm_quotas (vm_id, quota, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (vm_id) DO UPDATE SET quota = excluded.quota,"
                " updated_at = excluded.updated_at",
                (vm_id, dumps(quota), to_iso(at)),
            )

    def delete(self, vm_id: str) -> bool:
        with self.db.write() as conn:
            cur = conn.execute("DELETE FROM vm_quotas WHERE vm_id = ?", (vm_id,))
            return cur.rowcount > 0

    def forget_vm(self, vm_id: str) -> None:
        """The VM is gone: drop its override and its counters in one transaction."""
        with self.db.write() as conn:
            conn.execute("DELETE FROM vm_quotas WHERE vm_id = ?", (vm_id,))
            conn.execute("DELETE FROM quota_violations WHERE vm_id = ?", (vm_id,))

    def record_violation(
        self, vm_id: str, kind: str, new_episode: bool, amount: float, detail: str, at: datetime
    ) -> None:
        with self.db.write() as conn:
            conn.execute(
                "INSERT INTO quota_violations"
                " (vm_id, kind, episodes, samples, total, first_at, last_at, last_detail)"
                " VALUES (?, ?, 1, 1, ?, ?, ?, ?)"
                " ON CONFLICT (vm_id, kind) DO UPDATE SET"
                " episodes = episodes + ?, samples = samples + 1, total = total + excluded.total,"
                " last_at = excluded.last_at, last_detail = excluded.last_detail",
                (vm_id, kind, amount, to_iso(at), to_iso(at), detail, 1 if new_episode else 0),
            )

    def violations(self, vm_id: str | None = None) -> list[ViolationCount]:
        """Every VM's counters, or one VM's; ordered by VM, then kind."""
        where, params = ("", ()) if vm_id is None else (" WHERE vm_id = ?", (vm_id,))
        rows = self.db.query(f"SELECT * FROM quota_violations{where} ORDER BY vm_id, kind", params)
        return [_violation(r) for r in rows]


def _violation(row: sqlite3.Row) -> ViolationCount:
    return ViolationCount(
        row["vm_id"],
        row["kind"],
        row["episodes"],
        row["samples"],
        row["total"],
        from_iso(row["first_at"]),  # type: ignore[arg-type]
        from_iso(row["last_at"]),  # type: ignore[arg-type]
        row["last_detail"],
    )
