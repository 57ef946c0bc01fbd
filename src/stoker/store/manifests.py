"""Manifest bookkeeping: one row per managed object, one row for the last apply.

Kept apart from the objects' own tables so that every kind (VMs, quotas, snapshot policies,
schedules, networks) records its manager the same way, and a capability's store needs no
column it does not use. A row per object is written right after the object changed, each in
its own transaction, so a crash mid-apply loses at most the account of one object.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime
from typing import TYPE_CHECKING, Any

from stoker.domain.manifests import ManagedObject, ManifestHead, ManifestSource

# schema.py imports this module while db.py is still loading: names at call time only
from stoker.store import db as _db

if TYPE_CHECKING:
    from stoker.store.db import Database

SCHEMA = """
CREATE TABLE manifest_objects (
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    object_id TEXT NOT NULL,
    applied TEXT,
    pending TEXT,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (kind, name)
);
CREATE TABLE manifest_head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    manifest_hash TEXT,
    sources TEXT NOT NULL DEFAULT '[]',
    summary TEXT NOT NULL DEFAULT '{}',
    applied_at TEXT,
    origin TEXT,
    applying_hash TEXT,
    applying_since TEXT,
    failure TEXT
);
"""


class ManifestStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # ------------------------------------------------------------------ managed objects

    def objects(self) -> list[ManagedObject]:
        rows = self.db.query("SELECT * FROM manifest_objects ORDER BY kind, name")
        return [_object(r) for r in rows]

    def put(
        self, kind: str, name: str, object_id: str, applied: dict[str, Any], at: datetime
    ) -> None:
        """The object now has ``applied`` (and no change is pending)."""
        with self.db.write() as conn:
            conn.execute(
                "INSERT INTO manifest_objects (kind, name, object_id, applied, updated_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (kind, name) DO UPDATE SET"
                " object_id = excluded.object_id, applied = excluded.applied,"
                " pending = NULL, updated_at = excluded.updated_at",
                (kind, name, object_id, _db.dumps(applied), _db.to_iso(at)),
            )

    def intend(
        self, kind: str, name: str, object_id: str, pending: dict[str, Any], at: datetime
    ) -> None:
        """A step is about to set ``pending`` on the object (``applied`` stays as it was)."""
        with self.db.write() as conn:
            conn.execute(
                "INSERT INTO manifest_objects (kind, name, object_id, pending, updated_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (kind, name) DO UPDATE SET"
                " object_id = excluded.object_id, pending = excluded.pending,"
                " updated_at = excluded.updated_at",
                (kind, name, object_id, _db.dumps(pending), _db.to_iso(at)),
            )

    def remove(self, kind: str, name: str) -> None:
        with self.db.write() as conn:
            conn.execute("DELETE FROM manifest_objects WHERE kind = ? AND name = ?", (kind, name))

    def remove_many(self, keys: list[tuple[str, str]]) -> None:
        with self.db.write() as conn:
            conn.executemany("DELETE FROM manifest_objects WHERE kind = ? AND name = ?", keys)

    # ------------------------------------------------------------------ the last apply

    def head(self) -> ManifestHead | None:
        row = self.db.query_one("SELECT * FROM manifest_head WHERE id = 1")
        return _head(row) if row is not None else None

    def begin(self, manifest_hash: str, at: datetime) -> None:
        """An apply starts: it stays "applying" until :meth:`finish` (or a failure)."""
        with self.db.write() as conn:
            conn.execute(
                "INSERT INTO manifest_head (id, applying_hash, applying_since, failure)"
                " VALUES (1, ?, ?, NULL) ON CONFLICT (id) DO UPDATE SET"
                " applying_hash = excluded.applying_hash,"
                " applying_since = excluded.applying_since, failure = NULL",
                (manifest_hash, _db.to_iso(at)),
            )

    def fail(self, failure: str) -> None:
        with self.db.write() as conn:
            conn.execute("UPDATE manifest_head SET failure = ? WHERE id = 1", (failure,))

    def finish(
        self,
        manifest_hash: str,
        sources: tuple[ManifestSource, ...],
        summary: dict[str, int],
        origin: str,
        at: datetime,
    ) -> None:
        text = json.dumps([{"name": s.name, "content": s.content} for s in sources])
        with self.db.write() as conn:
            conn.execute(
                "INSERT INTO manifest_head (id, manifest_hash, sources, summary, applied_at,"
                " origin) VALUES (1, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
                " manifest_hash = excluded.manifest_hash, sources = excluded.sources,"
                " summary = excluded.summary, applied_at = excluded.applied_at,"
                " origin = excluded.origin, applying_hash = NULL, applying_since = NULL,"
                " failure = NULL",
                (manifest_hash, text, _db.dumps(summary), _db.to_iso(at), origin),
            )


def _object(row: sqlite3.Row) -> ManagedObject:
    return ManagedObject(
        kind=row["kind"],
        name=row["name"],
        object_id=row["object_id"],
        applied=_json(row["applied"]),
        updated_at=_db.from_iso(row["updated_at"]),  # type: ignore[arg-type]
        pending=_json(row["pending"]),
    )


def _json(text: str | None) -> dict[str, Any] | None:
    return None if text is None else dict(json.loads(text))


def _head(row: sqlite3.Row) -> ManifestHead:
    sources = tuple(ManifestSource(s["name"], s["content"]) for s in json.loads(row["sources"]))
    return ManifestHead(
        manifest_hash=row["manifest_hash"],
        sources=sources,
        summary=dict(json.loads(row["summary"])),
        applied_at=_db.from_iso(row["applied_at"]),
        origin=row["origin"],
        applying_hash=row["applying_hash"],
        applying_since=_db.from_iso(row["applying_since"]),
        failure=row["failure"],
    )
