"""The SQLite store: migrations from empty and from every earlier version, CAS state writes."""

import sqlite3
from datetime import UTC, datetime

import pytest

from stoker.domain.spec import VMSpec
from stoker.domain.states import VMState
from stoker.domain.vm import VM
from stoker.store.db import Database, SchemaTooNew, from_iso, to_iso
from stoker.store.events import EventStore
from stoker.store.schema import MIGRATIONS
from stoker.store.vms import NameTaken, VMStore

NOW = datetime(2026, 11, 21, 6, 30, tzinfo=UTC)


def make_vm(name="web", vm_id="a" * 32):
    spec = VMSpec(name=name, kernel="/k")
    return VM(vm_id, name, spec, VMState.PENDING, "created", NOW, NOW)


def test_empty_file_migrates_to_latest(tmp_path):
    db = Database(tmp_path / "s.db")
    assert db.version == len(MIGRATIONS)
    mode = db.query_one("PRAGMA journal_mode")[0]
    assert mode == "wal"
    assert db.query_one("PRAGMA synchronous")[0] == 2  # FULL


@pytest.mark.parametrize("start", range(len(MIGRATIONS) + 1))
def test_migrates_from_each_earlier_version(tmp_path, start):
    path = tmp_path / "s.db"
    Database(path, MIGRATIONS[:start]).close()
    db = Database(path)
    assert db.version == len(MIGRATIONS)
    VMStore(db).insert(make_vm())
    assert VMStore(db).get("web") is not None


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "s.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(SchemaTooNew):
        Database(path)


def test_failed_migration_leaves_previous_version(tmp_path):
    path = tmp_path / "s.db"
    with pytest.raises(sqlite3.OperationalError):
        Database(path, [*MIGRATIONS, "CREATE TABLE broken (;"])
    assert Database(path).version == len(MIGRATIONS)


def test_insert_get_by_id_and_name(tmp_path):
    store = VMStore(Database(tmp_path / "s.db"))
    store.insert(make_vm())
    assert store.get("a" * 32).name == "web"
    assert store.get("web").id == "a" * 32
    assert store.get("nope") is None
    with pytest.raises(NameTaken):
        store.insert(make_vm(vm_id="b" * 32))


def test_compare_and_set_records_transition(tmp_path):
    store = VMStore(Database(tmp_path / "s.db"))
    store.insert(make_vm())
    assert store.compare_and_set_state("a" * 32, VMState.PENDING, VMState.STARTING, "go", NOW)
    assert not store.compare_and_set_state("a" * 32, VMState.PENDING, VMState.STARTING, "x", NOW)
    vm = store.get("web", with_transitions=10)
    assert vm.state == VMState.STARTING and vm.state_reason == "go"
    assert [t.to_state for t in vm.transitions] == [VMState.STARTING, VMState.PENDING]


def test_delete_removes_history(tmp_path):
    db = Database(tmp_path / "s.db")
    store = VMStore(db)
    store.insert(make_vm())
    store.delete("a" * 32)
    assert store.get("web") is None
    assert db.query("SELECT * FROM transitions") == []


def test_event_log_is_bounded_and_filterable(tmp_path):
    events = EventStore(Database(tmp_path / "s.db"), max_events=500)
    for i in range(2500):
        events.append(NOW, "vm1" if i % 2 else None, "vm.state" if i % 3 else "alert", f"e{i}", {})
    total = events.db.query_one("SELECT COUNT(*) FROM events")[0]
    assert total <= 1500
    assert all(e.vm_id == "vm1" for e in events.query(vm_id="vm1"))
    assert all(e.type.startswith("vm.") for e in events.query(type="vm.*"))


def test_iso_round_trip():
    assert from_iso(to_iso(NOW)) == NOW


def test_a_write_inside_a_write_is_one_transaction(tmp_path):
    """A state, its event and what goes with them commit together or not at all."""
    db = Database(tmp_path / "s.db")
    events = EventStore(db)
    with pytest.raises(RuntimeError), db.write():
        events.append(datetime.now(UTC), None, "x", "first", {})
        with db.write():
            events.append(datetime.now(UTC), None, "x", "second", {})
        raise RuntimeError("the outer change fails after the inner one")
    assert events.query(limit=10) == []
    with db.write():
        events.append(datetime.now(UTC), None, "x", "first", {})
        with db.write():
            events.append(datetime.now(UTC), None, "x", "second", {})
    assert sorted(e.message for e in events.query(limit=10)) == ["first", "second"]


def test_a_write_not_waited_onto_the_disk_leaves_every_other_durable(tmp_path):
    db = Database(tmp_path / "s.db")

    def synchronous() -> int:
        return int(db.conn.execute("PRAGMA synchronous").fetchone()[0])

    assert synchronous() == 2  # FULL
    with db.write(durable=False):
        assert synchronous() == 1  # NORMAL: committed into the log, not fsynced
    assert synchronous() == 2
    with pytest.raises(RuntimeError), db.write(durable=False):
        raise RuntimeError("failed")
    assert synchronous() == 2
