"""Snapshot index and per-VM snapshot policies.

The snapshot's directory (with its manifest) is the truth; a row here is the index that
makes listing and retention cheap. The service writes the directory first (atomically) and
the row second, and reconciles the two at agent start.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from stoker.domain.snapshots import PolicyRecord, SnapshotRecord, VerifyRecord

# Module import, not names: store.db imports the schema, which imports this module.
from stoker.store import db as _db

if TYPE_CHECKING:
    from stoker.store.db import Database

SCHEMA = """
CREATE TABLE snapshots (
    id TEXT PRIMARY KEY,
    vm_id TEXT NOT NULL,
    vm_name TEXT NOT NULL,
    created_at TEXT NOT NULL,
    kind TEXT NOT NULL,
    tags TEXT NOT NULL DEFAULT '[]',
    protected INTEGER NOT NULL DEFAULT 0,
    with_memory INTEGER NOT NULL,
    size_bytes INTEGER NOT NULL,
    path TEXT NOT NULL,
    pause_s REAL,
    verified_at TEXT,
    verify_ok INTEGER,
    verify_deep INTEGER,
    verify_detail TEXT,
    verify_duration_s REAL
);
CREATE INDEX snapshots_by_vm ON snapshots (vm_id, created_at);
CREATE TABLE snapshot_policies (
    vm_id TEXT PRIMARY KEY,
    retention TEXT,
    interval_s INTEGER,
    last_auto_at TEXT,
    updated_at TEXT NOT NULL
);
"""


class SnapshotStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def _write(self, sql: str, params: Sequence[Any]) -> None:
        """One statement in its own write transaction."""
        with self.db.write() as conn:
            conn.execute(sql, params)

    # ------------------------------------------------------------------------- snapshots

    def insert(self, s: SnapshotRecord) -> None:
        self._write(
            "INSERT INTO snapshots (id, vm_id, vm_name, created_at, kind, tags, protected,"
            " with_memory, size_bytes, path, pause_s) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                s.id,
                s.vm_id,
                s.vm_name,
                _db.to_iso(s.created),
                s.kind,
                _db.dumps(list(s.tags)),
                int(s.protected),
                int(s.with_memory),
                s.size_bytes,
                s.path,
                s.pause_s,
            ),
        )

    def get(self, snapshot_id: str) -> SnapshotRecord | None:
        row = self.db.query_one("SELECT * FROM snapshots WHERE id = ?", (snapshot_id,))
        return _snapshot(row) if row else None

    def all(self, vm_id: str | None = None) -> list[SnapshotRecord]:
        """Oldest first."""
        if vm_id is None:
            rows = self.db.query("SELECT * FROM snapshots ORDER BY created_at, id")
        else:
            rows = self.db.query(
                "SELECT * FROM snapshots WHERE vm_id = ? ORDER BY created_at, id", (vm_id,)
            )
        return [_snapshot(r) for r in rows]

    def set_protected(self, snapshot_id: str, protected: bool) -> None:
        self._write(
            "UPDATE snapshots SET protected = ? WHERE id = ?", (int(protected), snapshot_id)
        )

    def set_verified(self, snapshot_id: str, v: VerifyRecord) -> None:
        self._write(
            "UPDATE snapshots SET verified_at = ?, verify_ok = ?, verify_deep = ?,"
            " verify_detail = ?, verify_duration_s = ? WHERE id = ?",
            (_db.to_iso(v.at), int(v.ok), int(v.deep), v.detail, v.duration_s, snapshot_id),
        )

    def delete(self, snapshot_id: str) -> None:
        self._write("DELETE FROM snapshots WHERE id = ?", (snapshot_id,))

    def set_path(self, snapshot_id: str, path: str) -> None:
        """The snapshot's directory moved (kept when its VM was deleted)."""
        self._write("UPDATE snapshots SET path = ? WHERE id = ?", (path, snapshot_id))

    # -------------------------------------------------------------------------- policies

    def get_policy(self, vm_id: str) -> PolicyRecord | None:
        row = self.db.query_one("SELECT * FROM snapshot_policies WHERE vm_id = ?", (vm_id,))
        return _policy(row) if row else None

    def policies(self) -> list[PolicyRecord]:
        return [_policy(r) for r in self.db.query("SELECT * FROM snapshot_policies")]

    def put_policy(
        self, vm_id: str, retention: str | None, interval_s: int | None, at: datetime
    ) -> None:
        self._write(
            "INSERT INTO snapshot_policies (vm_id, retention, interval_s, updated_at)"
            " VALUES (?, ?, ?, ?) ON CONFLICT(vm_id) DO UPDATE SET"
            " retention = excluded.retention, interval_s = excluded.interval_s,"
            " updated_at = excluded.updated_at",
            (vm_id, retention, interval_s, _db.to_iso(at)),
        )

    def set_last_auto(self, vm_id: str, at: datetime) -> None:
        self._write(
            "UPDATE snapshot_policies SET last_auto_at = ? WHERE vm_id = ?",
            (_db.to_iso(at), vm_id),
        )

    def delete_policy(self, vm_id: str) -> None:
        self._write("DELETE FROM snapshot_policies WHERE vm_id = ?", (vm_id,))


def _snapshot(row: sqlite3.Row) -> SnapshotRecord:
    verified = None
    if row["verified_at"] is not None:
        verified = VerifyRecord(
            at=_db.from_iso(row["verified_at"]),  # type: ignore[arg-type]
            ok=bool(row["verify_ok"]),
            deep=bool(row["verify_deep"]),
            detail=str(row["verify_detail"] or ""),
            duration_s=float(row["verify_duration_s"] or 0.0),
        )
    return SnapshotRecord(
        id=row["id"],
        vm_id=row["vm_id"],
        vm_name=row["vm_name"],
        created=_db.from_iso(row["created_at"]),  # type: ignore[arg-type]
        kind=row["kind"],
        tags=tuple(json.loads(row["tags"])),
        protected=bool(row["protected"]),
        with_memory=bool(row["with_memory"]),
        size_bytes=int(row["size_bytes"]),
        path=row["path"],
        pause_s=row["pause_s"],
        verified=verified,
    )


def _policy(row: sqlite3.Row) -> PolicyRecord:
    return PolicyRecord(
        vm_id=row["vm_id"],
        retention=row["retention"],
        interval_s=row["interval_s"],
        last_auto_at=_db.from_iso(row["last_auto_at"]),
        updated_at=_db.from_iso(row["updated_at"]),  # type: ignore[arg-type]
    )
