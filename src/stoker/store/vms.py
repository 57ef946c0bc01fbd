"""VM rows and their state history.

A row that cannot be decoded (a spec an older or damaged database holds, a bad state or
date) never stops a listing, a loop or the agent's start: it reads back as a VM in ``error``
with the reason "record unreadable", and the details are logged once.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from datetime import UTC, datetime
from typing import Any

from stoker.domain.process import ProcessRecord
from stoker.domain.spec import VMSpec
from stoker.domain.states import VMState
from stoker.domain.vm import VM, Transition
from stoker.store.db import Database, dumps, from_iso, to_iso

log = logging.getLogger("stoker.store")

UNREADABLE = "record unreadable"
#: state transitions kept per VM (the oldest go first); ``[history] transitions_per_vm``
DEFAULT_MAX_TRANSITIONS = 1000
#: ids of unreadable rows already logged: each is logged once per agent run, whichever of
#: the stores reading the table (the lifecycle's, the reports') meets it first
_LOGGED_UNREADABLE: set[str] = set()


class NameTaken(Exception):
    pass


class VMStore:
    def __init__(self, db: Database, max_transitions: int = DEFAULT_MAX_TRANSITIONS) -> None:
        self.db = db
        self.max_transitions = max_transitions
        # spec JSON -> validated spec: a spec is validated when written, and re-validating
        # every row on every read made listing 1,000 VMs take tens of milliseconds
        self._specs: dict[str, VMSpec] = {}
        # row values -> decoded VM, for the same reason: most rows are unchanged between reads
        self._rows: dict[str, tuple[tuple[Any, ...], VM]] = {}

    def _spec(self, text: str) -> VMSpec:
        spec = self._specs.get(text)
        if spec is None:
            if len(self._specs) > 10_000:
                self._specs.clear()
            spec = self._specs[text] = VMSpec.model_validate_json(text)
        return spec

    def _vm(self, row: sqlite3.Row, transitions: tuple[Transition, ...] = ()) -> VM:
        if transitions:
            return self._decode(row, transitions)
        values = tuple(row)
        hit = self._rows.get(row["id"])
        if hit is not None and hit[0] == values:
            return hit[1]
        if len(self._rows) > 100_000:
            self._rows.clear()
        vm = self._decode(row, ())
        self._rows[row["id"]] = (values, vm)
        return vm

    def _decode(self, row: sqlite3.Row, transitions: tuple[Transition, ...]) -> VM:
        try:
            return self._decode_strictly(row, transitions)
        except Exception as exc:  # whatever is wrong with a stored row, the rest must load
            return self._unreadable(row, exc)

    def _unreadable(self, row: sqlite3.Row, exc: Exception) -> VM:
        """A stand-in for a row that cannot be decoded: ``error``, a placeholder spec that is
        never run, the recorded VMM (if that part reads) so a forced delete can end it."""
        vm_id = str(row["id"])
        name = row["name"] if isinstance(row["name"], str) else vm_id
        detail = f"{type(exc).__name__}: {exc}"
        if vm_id not in _LOGGED_UNREADABLE:
            _LOGGED_UNREADABLE.add(vm_id)
            log.error(
                "VM %s (%s): stored record unreadable, shown in error; delete it or restore "
                "the database from a backup: %s",
                name,
                vm_id,
                detail,
            )
        process = None
        try:
            process = (
                ProcessRecord.from_json(json.loads(row["process"])) if row["process"] else None
            )
        except Exception:
            process = None
        since = _time_or_epoch(row["state_since"])
        return VM(
            id=vm_id,
            name=name,
            spec=VMSpec.model_construct(name=name, kernel="/"),
            state=VMState.ERROR,
            state_reason=UNREADABLE,
            state_since=since,
            created_at=_time_or_epoch(row["created_at"]),
            process=process,
            unreadable=detail,
        )

    def _decode_strictly(self, row: sqlite3.Row, transitions: tuple[Transition, ...]) -> VM:
        return VM(
            id=row["id"],
            name=row["name"],
            spec=self._spec(row["spec"]),
            state=VMState(row["state"]),
            state_reason=row["state_reason"],
            state_since=from_iso(row["state_since"]),  # type: ignore[arg-type]
            created_at=from_iso(row["created_at"]),  # type: ignore[arg-type]
            process=ProcessRecord.from_json(json.loads(row["process"])) if row["process"] else None,
            restart_count=row["restart_count"],
            last_restart_at=from_iso(row["last_restart_at"]),
            next_retry_at=from_iso(row["next_retry_at"]),
            transitions=transitions,
        )

    def insert(self, vm: VM) -> None:
        try:
            with self.db.write() as conn:
                conn.execute(
                    "INSERT INTO vms (id, name, spec, state, state_reason, state_since, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        vm.id,
                        vm.name,
                        vm.spec.model_dump_json(),
                        vm.state.value,
                        vm.state_reason,
                        to_iso(vm.state_since),
                        to_iso(vm.created_at),
                    ),
                )
                conn.execute(
                    "INSERT INTO transitions (vm_id, from_state, to_state, reason, at)"
                    " VALUES (?, NULL, ?, ?, ?)",
                    (vm.id, vm.state.value, vm.state_reason, to_iso(vm.state_since)),
                )
        except sqlite3.IntegrityError as exc:
            raise NameTaken(vm.name) from exc

    def get(self, ref: str, *, with_transitions: int = 0) -> VM | None:
        """Find a VM by id, else by name (both are accepted wherever a VM is named)."""
        row = self.db.query_one("SELECT * FROM vms WHERE id = ?", (ref,)) or self.db.query_one(
            "SELECT * FROM vms WHERE name = ?", (ref,)
        )
        if row is None:
            return None
        transitions = self.transitions(row["id"], with_transitions) if with_transitions else ()
        return self._vm(row, transitions)

    def row_state(self, vm_id: str) -> str | None:
        """The state word the row holds, even for an unreadable record."""
        row = self.db.query_one("SELECT state FROM vms WHERE id = ?", (vm_id,))
        return str(row["state"]) if row else None

    def all(self, state: VMState | None = None) -> list[VM]:
        if state is None:
            rows = self.db.query("SELECT * FROM vms ORDER BY name")
        else:
            rows = self.db.query("SELECT * FROM vms WHERE state = ? ORDER BY name", (state.value,))
        return [self._vm(r) for r in rows]

    def transitions(self, vm_id: str, limit: int = 20) -> tuple[Transition, ...]:
        rows = self.db.query(
            "SELECT * FROM transitions WHERE vm_id = ? ORDER BY id DESC LIMIT ?", (vm_id, limit)
        )
        return tuple(t for t in map(_transition_or_none, rows) if t is not None)

    def transitions_before(self, end: datetime) -> dict[str, list[Transition]]:
        """Every VM's transitions before ``end``, oldest first, keyed by VM id: reports need
        the state each VM was in when a period began, not only the changes inside it."""
        rows = self.db.query("SELECT * FROM transitions WHERE at < ? ORDER BY id", (to_iso(end),))
        out: dict[str, list[Transition]] = {}
        for r in rows:
            transition = _transition_or_none(r)
            if transition is not None:
                out.setdefault(r["vm_id"], []).append(transition)
        return out

    def compare_and_set_state(
        self, vm_id: str, expected: VMState, new: VMState, reason: str, at: datetime
    ) -> bool:
        """Move ``vm_id`` from ``expected`` to ``new``; False if someone moved it first."""
        with self.db.write() as conn:
            cur = conn.execute(
                "UPDATE vms SET state = ?, state_reason = ?, state_since = ?"
                " WHERE id = ? AND state = ?",
                (new.value, reason, to_iso(at), vm_id, expected.value),
            )
            if cur.rowcount != 1:
                return False
            conn.execute(
                "INSERT INTO transitions (vm_id, from_state, to_state, reason, at)"
                " VALUES (?, ?, ?, ?, ?)",
                (vm_id, expected.value, new.value, reason, to_iso(at)),
            )
            # bounded history: the oldest transitions beyond the limit go
            conn.execute(
                "DELETE FROM transitions WHERE vm_id = ? AND id <= (SELECT id FROM transitions"
                " WHERE vm_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (vm_id, vm_id, self.max_transitions),
            )
        return True

    def set_process(self, vm_id: str, process: ProcessRecord | None, durable: bool = True) -> None:
        """``durable=False`` for a VMM just spawned: its record must survive an agent crash
        (it does, once committed), and a power cut ends the VMM with it."""
        with self.db.write(durable) as conn:
            conn.execute(
                "UPDATE vms SET process = ? WHERE id = ?",
                (dumps(process.to_json()) if process is not None else None, vm_id),
            )

    def set_restart_info(
        self,
        vm_id: str,
        count: int,
        last_restart_at: datetime | None,
        next_retry_at: datetime | None,
    ) -> None:
        with self.db.write() as conn:
            conn.execute(
                "UPDATE vms SET restart_count = ?, last_restart_at = ?, next_retry_at = ?"
                " WHERE id = ?",
                (
                    count,
                    to_iso(last_restart_at) if last_restart_at else None,
                    to_iso(next_retry_at) if next_retry_at else None,
                    vm_id,
                ),
            )

    def update_spec(self, vm_id: str, spec: VMSpec) -> None:
        with self.db.write() as conn:
            conn.execute("UPDATE vms SET spec = ? WHERE id = ?", (spec.model_dump_json(), vm_id))

    def delete(self, vm_id: str) -> None:
        with self.db.write() as conn:
            conn.execute("DELETE FROM transitions WHERE vm_id = ?", (vm_id,))
            conn.execute("DELETE FROM vms WHERE id = ?", (vm_id,))

    def count(self) -> int:
        row = self.db.query_one("SELECT COUNT(*) FROM vms")
        return int(row[0]) if row else 0


def _time_or_epoch(text: Any) -> datetime:
    try:
        return from_iso(text) or datetime(1970, 1, 1, tzinfo=UTC)
    except (TypeError, ValueError):
        return datetime(1970, 1, 1, tzinfo=UTC)


def _transition_or_none(row: sqlite3.Row) -> Transition | None:
    """A transition row, or None (skipped) when it cannot be decoded."""
    try:
        return _transition(row)
    except (TypeError, ValueError):
        return None


def _transition(row: sqlite3.Row) -> Transition:
    return Transition(
        from_state=VMState(row["from_state"]) if row["from_state"] else None,
        to_state=VMState(row["to_state"]),
        reason=row["reason"],
        at=from_iso(row["at"]),  # type: ignore[arg-type]
    )
