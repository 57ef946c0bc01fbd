"""Which VM holds which uid, and which uids were freed when.

A VM keeps its uid for its whole life (its files stay owned by it between runs); the row goes
to "released" when the VM is deleted, so the allocator can hand that uid out last.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import TYPE_CHECKING

from stoker.domain.uids import UidRange, allocate_uid

# schema.py imports this module while db.py is still loading: names at call time only
from stoker.store import db as _db

if TYPE_CHECKING:
    from stoker.store.db import Database

SCHEMA = """
CREATE TABLE vm_uids (
    uid INTEGER PRIMARY KEY,
    vm_id TEXT UNIQUE,
    assigned_at TEXT NOT NULL,
    released_at TEXT
);
"""


class UidStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def held(self, vm_id: str) -> int | None:
        row = self.db.query_one("SELECT uid FROM vm_uids WHERE vm_id = ?", (vm_id,))
        return int(row[0]) if row is not None else None

    def assign(
        self, vm_id: str, id_range: UidRange, reserved: Collection[int], at: datetime
    ) -> int:
        """The VM's uid, allocated in one transaction the first time it is asked for."""
        with self.db.write() as conn:
            row = conn.execute("SELECT uid FROM vm_uids WHERE vm_id = ?", (vm_id,)).fetchone()
            if row is not None:
                return int(row[0])
            live = [r[0] for r in conn.execute("SELECT uid FROM vm_uids WHERE vm_id IS NOT NULL")]
            released = [
                r[0]
                for r in conn.execute(
                    "SELECT uid FROM vm_uids WHERE vm_id IS NULL ORDER BY released_at, uid"
                )
            ]
            uid = allocate_uid(id_range, live, released, reserved)
            conn.execute(
                "INSERT INTO vm_uids (uid, vm_id, assigned_at, released_at) VALUES (?, ?, ?, NULL)"
                " ON CONFLICT (uid) DO UPDATE SET vm_id = excluded.vm_id,"
                " assigned_at = excluded.assigned_at, released_at = NULL",
                (uid, vm_id, _db.to_iso(at)),
            )
            return uid

    def release(self, vm_id: str, at: datetime) -> int | None:
        """The VM is gone: its uid goes to the back of the queue."""
        with self.db.write() as conn:
            row = conn.execute("SELECT uid FROM vm_uids WHERE vm_id = ?", (vm_id,)).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE vm_uids SET vm_id = NULL, released_at = ? WHERE uid = ?",
                (_db.to_iso(at), row[0]),
            )
            return int(row[0])
