"""Schema migrations, keyed on ``PRAGMA user_version``.

Migration N (1-based) moves a database from version N-1 to N. A migration is never edited
once released; a change is a new migration at the end. Each capability owns one slot so
they can grow independently.
"""

from __future__ import annotations

from stoker.store import health, quotas, resources, schedules, snapshots, uids
from stoker.store import manifests as manifests_store
from stoker.store import networks as networks_store

MIGRATIONS: list[str] = [
    # 1: VMs, their state history and the event log
    """
    CREATE TABLE vms (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        spec TEXT NOT NULL,
        state TEXT NOT NULL,
        state_reason TEXT NOT NULL,
        state_since TEXT NOT NULL,
        created_at TEXT NOT NULL,
        process TEXT,
        restart_count INTEGER NOT NULL DEFAULT 0,
        last_restart_at TEXT,
        next_retry_at TEXT
    );
    CREATE TABLE transitions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        vm_id TEXT NOT NULL,
        from_state TEXT,
        to_state TEXT NOT NULL,
        reason TEXT NOT NULL,
        at TEXT NOT NULL
    );
    CREATE INDEX transitions_by_vm ON transitions (vm_id, id);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at TEXT NOT NULL,
        vm_id TEXT,
        type TEXT NOT NULL,
        message TEXT NOT NULL,
        data TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX events_by_vm ON events (vm_id, id);
    CREATE INDEX events_by_type ON events (type, id);
    """,
    health.SCHEMA,
    schedules.SCHEMA,
    resources.SCHEMA,
    snapshots.SCHEMA,
    quotas.SCHEMA,
    uids.SCHEMA,
    networks_store.SCHEMA,
    manifests_store.SCHEMA,
]
