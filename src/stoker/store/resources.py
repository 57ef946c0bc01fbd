"""Reservations and usage history.

A reservation row is written in the same BEGIN IMMEDIATE transaction that read the totals
it was checked against, so two starts can never both see the same free memory, and a
reservation outlives an agent restart (a re-adopted VM stays counted).

Samples are kept at the sampling interval for a short while, then folded into coarser
buckets (averages for gauges, the last value for cumulative counters) and finally dropped
after the history window, so a day of history stays a few hundred rows per series. Sample
times are UTC epoch seconds (REAL): fits and range scans need numbers, not text.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from stoker.domain.capacity import Allocation, Request, Shortfall
from stoker.domain.usage import NodeSample, Reservation, VMSample

# schema.py imports this module for SCHEMA while db.py is still importing schema.py:
# take db as a module and use its names at call time, never at import time.
from stoker.store import db as _db

if TYPE_CHECKING:
    from stoker.store.db import Database

SCHEMA = """
CREATE TABLE reservations (
    vm_id TEXT PRIMARY KEY,
    vcpus INTEGER NOT NULL,
    memory_bytes INTEGER NOT NULL,
    reserved_at TEXT NOT NULL
);
CREATE TABLE node_samples (
    t REAL NOT NULL,
    resolution_s REAL NOT NULL,
    vms INTEGER NOT NULL,
    vcpus_allocated REAL NOT NULL,
    memory_allocated REAL NOT NULL,
    cpu_used REAL,
    memory_used REAL,
    host_cpu_percent REAL,
    host_memory_used REAL
);
CREATE INDEX node_samples_by_t ON node_samples (t);
CREATE TABLE vm_samples (
    vm_id TEXT NOT NULL,
    t REAL NOT NULL,
    resolution_s REAL NOT NULL,
    cpu_percent REAL,
    memory_bytes REAL,
    disk_read_bytes REAL,
    disk_write_bytes REAL,
    net_rx_bytes REAL,
    net_tx_bytes REAL
);
CREATE INDEX vm_samples_by_vm ON vm_samples (vm_id, t);
CREATE INDEX vm_samples_by_t ON vm_samples (t);
"""


NODE_COLUMNS = [f.name for f in fields(NodeSample)]
VM_COLUMNS = [f.name for f in fields(VMSample)]
#: how each column folds into a coarser bucket: gauges average, cumulative counters keep max
_NODE_FOLD = {c: "AVG" for c in NODE_COLUMNS if c not in ("t", "resolution_s")}
_VM_FOLD = {
    "cpu_percent": "AVG",
    "memory_bytes": "AVG",
    "disk_read_bytes": "MAX",
    "disk_write_bytes": "MAX",
    "net_rx_bytes": "MAX",
    "net_tx_bytes": "MAX",
}

Admit = Callable[[Allocation], Shortfall | None]
_R = TypeVar("_R")


@dataclass(frozen=True)
class VMRow:
    id: str
    name: str
    state: str
    restart_count: int
    health: str | None


class ResourceStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._has_health: bool | None = None

    # ------------------------------------------------------------------------ reservations

    def reserve(self, vm_id: str, request: Request, at: datetime, admit: Admit) -> Shortfall | None:
        """Check and reserve in one transaction; a VM already holding a reservation keeps it.

        ``admit`` sees the totals read inside the transaction and returns why the request does
        not fit (nothing is written then) or None (the row is written before COMMIT).
        """
        with self.db.write() as conn:
            if conn.execute("SELECT 1 FROM reservations WHERE vm_id = ?", (vm_id,)).fetchone():
                return None
            shortfall = admit(_allocation(conn.execute(_TOTALS).fetchone()))
            if shortfall is None:
                conn.execute(
                    "INSERT INTO reservations (vm_id, vcpus, memory_bytes, reserved_at)"
                    " VALUES (?, ?, ?, ?)",
                    (vm_id, request.vcpus, request.memory_bytes, _db.to_iso(at)),
                )
            return shortfall

    def release(self, vm_id: str) -> bool:
        """Drop a reservation; False when there was none (releasing twice is harmless)."""
        with self.db.write() as conn:
            return conn.execute("DELETE FROM reservations WHERE vm_id = ?", (vm_id,)).rowcount > 0

    def allocated(self) -> Allocation:
        return _allocation(self.db.query_one(_TOTALS))

    def reservations(self) -> list[Reservation]:
        rows = self.db.query(
            "SELECT r.*, v.name, v.state FROM reservations r LEFT JOIN vms v ON v.id = r.vm_id"
            " ORDER BY v.name"
        )
        return _records(Reservation, rows)

    def reconcile(
        self, holding_states: Iterable[str], free_states: Iterable[str], at: datetime
    ) -> tuple[int, int]:
        """Repair reservations after a crash between a state change and its bookkeeping.

        Rows for deleted VMs or VMs in ``free_states`` are dropped; VMs in ``holding_states``
        without a row get one (without a capacity check: they already run). Returns
        (dropped, added).
        """
        holding, free = list(holding_states), list(free_states)
        with self.db.write() as conn:
            dropped = conn.execute(
                "DELETE FROM reservations WHERE vm_id NOT IN (SELECT id FROM vms)"
                f" OR vm_id IN (SELECT id FROM vms WHERE state IN ({_marks(free)}))",
                free,
            ).rowcount
            missing = conn.execute(
                f"SELECT id, spec FROM vms WHERE state IN ({_marks(holding)})"
                " AND id NOT IN (SELECT vm_id FROM reservations)",
                holding,
            ).fetchall()
            for row in missing:
                conn.execute(
                    "INSERT INTO reservations (vm_id, vcpus, memory_bytes, reserved_at)"
                    " VALUES (?, json_extract(?, '$.vcpus'),"
                    " json_extract(?, '$.memory_mib') * 1048576, ?)",
                    (row["id"], row["spec"], row["spec"], _db.to_iso(at)),
                )
        return dropped, len(missing)

    # ---------------------------------------------------------------------------- VM facts

    def vm_rows(self) -> list[VMRow]:
        """Every VM's id, name, state, restart count and health verdict (when the health
        capability keeps one), without decoding specs: cheap enough for every scrape."""
        if self._has_health is None:
            self._has_health = (
                self.db.query_one(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'health_vms'"
                )
                is not None
            )
        health = "h.health" if self._has_health else "NULL"
        join = " LEFT JOIN health_vms h ON h.vm_id = v.id" if self._has_health else ""
        rows = self.db.query(
            f"SELECT v.id, v.name, v.state, v.restart_count, {health} FROM vms v{join}"
            " ORDER BY v.name"
        )
        return [VMRow(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    # ----------------------------------------------------------------------------- samples

    def add_samples(self, node: NodeSample, vms: Sequence[VMSample]) -> None:
        with self.db.write() as conn:
            conn.execute(_insert("node_samples", NODE_COLUMNS), _values(node, NODE_COLUMNS))
            conn.executemany(
                _insert("vm_samples", VM_COLUMNS), [_values(s, VM_COLUMNS) for s in vms]
            )

    def node_samples(self, since_t: float, until_t: float | None = None) -> list[NodeSample]:
        rows = self.db.query(
            "SELECT * FROM node_samples WHERE t >= ? AND t <= ? ORDER BY t",
            (since_t, until_t if until_t is not None else float("inf")),
        )
        return _records(NodeSample, rows)

    def vm_samples(
        self, vm_id: str, since_t: float, until_t: float | None = None
    ) -> list[VMSample]:
        rows = self.db.query(
            "SELECT * FROM vm_samples WHERE vm_id = ? AND t >= ? AND t <= ? ORDER BY t",
            (vm_id, since_t, until_t if until_t is not None else float("inf")),
        )
        return _records(VMSample, rows)

    def count_samples(self) -> tuple[int, int]:
        node = self.db.query_one("SELECT COUNT(*) FROM node_samples")
        vm = self.db.query_one("SELECT COUNT(*) FROM vm_samples")
        return (int(node[0]) if node else 0, int(vm[0]) if vm else 0)

    def compact(self, now_t: float, raw_keep_s: float, bucket_s: float, keep_s: float) -> None:
        """Fold samples finer than ``bucket_s`` older than ``raw_keep_s`` into buckets of
        ``bucket_s``; drop everything older than ``keep_s``. One transaction.

        Only whole buckets are folded (the cut is aligned down to a bucket edge), so a
        bucket is never folded twice with part of its samples missing.
        """
        cut = (now_t - raw_keep_s) // bucket_s * bucket_s
        with self.db.write() as conn:
            # a row goes once all of the time it covers is older than the history window
            for table in ("node_samples", "vm_samples"):
                conn.execute(f"DELETE FROM {table} WHERE t + resolution_s <= ?", (now_t - keep_s,))
            _fold(conn, "node_samples", _NODE_FOLD, (), cut, bucket_s)
            _fold(conn, "vm_samples", _VM_FOLD, ("vm_id",), cut, bucket_s)

    def drop_vm_samples(self, vm_id: str) -> None:
        with self.db.write() as conn:
            conn.execute("DELETE FROM vm_samples WHERE vm_id = ?", (vm_id,))


_TOTALS = (
    "SELECT COUNT(*), COALESCE(SUM(vcpus), 0), COALESCE(SUM(memory_bytes), 0) FROM reservations"
)


def _allocation(row: sqlite3.Row | None) -> Allocation:
    vms, vcpus, memory = (row[0], row[1], row[2]) if row is not None else (0, 0, 0)
    return Allocation(vms=int(vms), vcpus=int(vcpus), memory_bytes=int(memory))


def _records(record: type[_R], rows: Iterable[Any]) -> list[_R]:
    """Rows whose columns are named like the record's fields, as records."""
    names = [f.name for f in fields(record)]  # type: ignore[arg-type]
    return [record(**{n: row[n] for n in names}) for row in rows]


def _marks(values: Sequence[object]) -> str:
    return ",".join("?" for _ in values) or "NULL"


def _insert(table: str, columns: Sequence[str]) -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({_marks(columns)})"


def _values(sample: object, columns: Sequence[str]) -> tuple[object, ...]:
    return tuple(getattr(sample, c) for c in columns)


def _fold(
    conn: object, table: str, fold: dict[str, str], keys: Sequence[str], cut: float, bucket: float
) -> None:
    """Replace rows finer than ``bucket`` before ``cut`` with one row per key and bucket,
    stamped at the bucket's start."""
    key_cols = "".join(f"{k}, " for k in keys)
    folded = ", ".join(f"{how}({col})" for col, how in fold.items())
    where = "resolution_s < ? AND t < ?"
    conn.execute(  # type: ignore[attr-defined]
        f"INSERT INTO {table} ({key_cols}t, resolution_s, {', '.join(fold)})"
        f" SELECT {key_cols}CAST(t / ? AS INTEGER) * ?, ?, {folded}"
        f" FROM {table} WHERE {where} GROUP BY {key_cols}CAST(t / ? AS INTEGER)",
        (bucket, bucket, bucket, bucket, cut, bucket),
    )
    conn.execute(f"DELETE FROM {table} WHERE {where}", (bucket, cut))  # type: ignore[attr-defined]
