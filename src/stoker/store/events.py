"""The bounded event log."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from stoker.domain.events import Event
from stoker.store.db import Database, dumps, from_iso, to_iso


class EventStore:
    def __init__(self, db: Database, max_events: int = 100_000) -> None:
        self.db = db
        self.max_events = max_events
        self._since_trim = 0

    def append(
        self, at: datetime, vm_id: str | None, type: str, message: str, data: dict[str, Any]
    ) -> Event:
        with self.db.write() as conn:
            cur = conn.execute(
                "INSERT INTO events (at, vm_id, type, message, data) VALUES (?, ?, ?, ?, ?)",
                (to_iso(at), vm_id, type, message, dumps(data)),
            )
            event_id = int(cur.lastrowid or 0)
            self._since_trim += 1
            if self._since_trim >= 1000:
                # keep the log bounded; trimming in batches keeps appends cheap
                conn.execute("DELETE FROM events WHERE id <= ?", (event_id - self.max_events,))
                self._since_trim = 0
        return Event(event_id, at, vm_id, type, message, data)

    def query(
        self,
        vm_id: str | None = None,
        since: datetime | None = None,
        type: str | None = None,
        after_id: int | None = None,
        limit: int = 100,
    ) -> list[Event]:
        clauses: list[str] = []
        params: list[object] = []
        if vm_id is not None:
            clauses.append("vm_id = ?")
            params.append(vm_id)
        if since is not None:
            clauses.append("at >= ?")
            params.append(to_iso(since))
        if type is not None:
            if type.endswith("*"):
                clauses.append("type LIKE ?")
                params.append(type[:-1] + "%")
            else:
                clauses.append("type = ?")
                params.append(type)
        if after_id is not None:
            clauses.append("id > ?")
            params.append(after_id)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self.db.query(
            f"SELECT * FROM (SELECT * FROM events {where} ORDER BY id DESC LIMIT ?) ORDER BY id",
            (*params, limit),
        )
        return [
            Event(
                r["id"],
                from_iso(r["at"]),  # type: ignore[arg-type]
                r["vm_id"],
                r["type"],
                r["message"],
                json.loads(r["data"]),
            )
            for r in rows
        ]
