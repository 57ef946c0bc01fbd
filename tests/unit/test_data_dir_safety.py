"""Issue 13, findings 3 (one agent per data dir), 6 (damaged database), 7 (permissions),
9 (bounded history) and the CLI's part of 4 and 10: the pieces, without an agent process
(tests/integration/test_agent_limits.py runs them in one).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stoker.cli.main import app
from stoker.config import AgentConfig
from stoker.domain.spec import VMSpec
from stoker.domain.states import VMState
from stoker.domain.vm import VM
from stoker.host import lockfile, perms
from stoker.services.backups import DatabaseConfig
from stoker.services.history import rotate_if_over
from stoker.services.reports import ReportGenerator
from stoker.startup import StartRefused, check_database, prepare_data_dir
from stoker.store import backup
from stoker.store.db import Database
from stoker.store.schedules import ScheduleStore
from stoker.store.vms import VMStore
from tests.fakes import FakeDriver

T0 = datetime(2026, 11, 21, 6, 30, tzinfo=UTC)


# ----------------------------------------------------------------------------- the lock


def test_a_second_agent_is_refused_naming_the_first(tmp_path: Path) -> None:
    held = lockfile.acquire(tmp_path)
    # another process (the lock is per open file, so a thread would not do)
    code = (
        "import sys; from pathlib import Path; from stoker.host import lockfile\n"
        "try:\n    lockfile.acquire(Path(sys.argv[1]))\n"
        "except lockfile.AlreadyLocked as exc:\n    print(exc); sys.exit(3)\n"
    )
    other = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True
    )
    assert other.returncode == 3, other.stderr
    assert f"(pid {os.getpid()})" in other.stdout
    assert lockfile.holder(tmp_path) == os.getpid()
    held.release()
    assert lockfile.holder(tmp_path) is None
    lockfile.acquire(tmp_path).release()  # free again


# ----------------------------------------------------------------------------- permissions


def test_data_dir_is_made_private_and_fixes_are_reported(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir(mode=0o755)
    (root / "stoker.db").write_text("")
    (root / "stoker.db").chmod(0o644)
    (root / "reports").mkdir(mode=0o755)
    (root / "reports" / "daily-2026-01-01.json").write_text("{}")
    (root / "reports" / "daily-2026-01-01.json").chmod(0o644)
    snapdir = root / "vms" / "abc" / "snapshots" / "s1" / "disks"
    snapdir.mkdir(parents=True, mode=0o755)
    (snapdir / "vd0.raw").write_text("x")
    (snapdir / "vd0.raw").chmod(0o664)
    console = root / "vms" / "abc" / "console.log"
    console.write_text("")
    console.chmod(0o640)  # the VMM's own file: left to the confinement code
    fixed = perms.make_private_data_dir(root)
    assert root.stat().st_mode & 0o777 == 0o711 or root.stat().st_mode & 0o777 == 0o700
    assert root.stat().st_mode & 0o066 == 0
    assert (root / "stoker.db").stat().st_mode & 0o777 == 0o600
    assert (snapdir / "vd0.raw").stat().st_mode & 0o777 == 0o600
    assert snapdir.stat().st_mode & 0o777 == 0o700
    assert console.stat().st_mode & 0o777 == 0o640
    assert root / "stoker.db" in fixed and snapdir / "vd0.raw" in fixed
    assert perms.make_private_data_dir(root) == []  # nothing left to fix


def test_a_data_dir_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the directory away")
    root = tmp_path / "data"
    root.mkdir()
    os.chown(root, 12345, 12345)
    with pytest.raises(perms.DataDirNotOurs, match="owned by uid 12345"):
        perms.make_private_data_dir(root)


# ----------------------------------------------------------------------------- the database


def _db_with_vm(path: Path) -> None:
    db = Database(path)
    spec = VMSpec(name="web", kernel="/k")
    VMStore(db).insert(VM("a" * 16, "web", spec, VMState.STOPPED, "made", T0, T0))
    db.close()


def test_inspect_tells_missing_empty_damaged_and_ok(tmp_path: Path) -> None:
    path = tmp_path / "stoker.db"
    assert backup.inspect(path).state == "missing" and not path.exists()
    path.write_bytes(b"")
    assert backup.inspect(path).state == "empty"
    path.write_bytes(b"garbage " * 512)
    assert backup.inspect(path).state == "damaged"
    path.unlink()
    _db_with_vm(path)
    assert backup.inspect(path) == backup.Inspection("ok", vms=1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    found = backup.inspect(path)
    assert found.state == "damaged" and found.problem


def test_damaged_database_is_one_line_naming_the_file_and_the_latest_backup(
    tmp_path: Path,
) -> None:
    db_path = tmp_path / "stoker.db"
    _db_with_vm(db_path)
    taken = backup.take_backup(db_path, tmp_path, keep=3)
    db_path.write_bytes(b"\0garbage" * 100)
    with pytest.raises(StartRefused) as refused:
        check_database(db_path, tmp_path, DatabaseConfig())
    message = str(refused.value)
    assert "\n" not in message and str(db_path) in message and str(taken) in message


def test_an_empty_database_beside_vm_directories_is_refused_unless_asked(tmp_path: Path) -> None:
    (tmp_path / "vms" / "0123456789abcdef").mkdir(parents=True)
    db_path = tmp_path / "stoker.db"
    for content in (None, b""):
        if content is not None:
            db_path.write_bytes(content)
        with pytest.raises(StartRefused, match="allow_empty_with_vm_dirs"):
            check_database(db_path, tmp_path, DatabaseConfig())
        check_database(db_path, tmp_path, DatabaseConfig(allow_empty_with_vm_dirs=True))
    # without VM directories an empty database is simply a new agent
    check_database(db_path, tmp_path / "elsewhere", DatabaseConfig())


def test_backups_keep_n_and_restore_keeps_the_replaced_file(tmp_path: Path) -> None:
    db_path = tmp_path / "stoker.db"
    _db_with_vm(db_path)
    taken = [
        backup.take_backup(db_path, tmp_path, keep=2, at=T0 + timedelta(seconds=i))
        for i in range(4)
    ]
    assert backup.backups(tmp_path) == [taken[3], taken[2]]
    assert taken[3].stat().st_mode & 0o777 == 0o600
    db_path.write_bytes(b"garbage" * 100)
    replaced = backup.restore(taken[3], db_path, at=T0)
    assert replaced is not None and replaced.read_bytes() == b"garbage" * 100
    assert backup.inspect(db_path) == backup.Inspection("ok", vms=1)
    with pytest.raises(backup.DatabaseDamaged):
        backup.restore(replaced, db_path)


def test_start_up_takes_the_lock_and_checks_the_database(tmp_path: Path) -> None:
    config = AgentConfig(data_dir=tmp_path / "d")
    lock = prepare_data_dir(config, DatabaseConfig())
    try:
        assert (tmp_path / "d").stat().st_mode & 0o077 == 0
        assert lockfile.holder(tmp_path / "d") == os.getpid()
    finally:
        lock.release()
        os.umask(0o022)


def test_cli_db_check_backup_restore(tmp_path: Path) -> None:
    runner = CliRunner()
    root = tmp_path / "d"
    root.mkdir()
    _db_with_vm(root / "stoker.db")
    opts = ["--data-dir", str(root)]
    checked = runner.invoke(app, ["db", "check", *opts])
    assert checked.exit_code == 0 and "ok" in checked.output and "1 VMs" in checked.output
    made = runner.invoke(app, ["db", "backup", *opts])
    assert made.exit_code == 0, made.output
    latest = backup.latest_backup(root)
    assert latest is not None
    (root / "stoker.db").write_bytes(b"garbage" * 100)
    damaged = runner.invoke(app, ["db", "check", *opts])
    assert damaged.exit_code == 1 and str(latest) in damaged.output
    held = lockfile.acquire(root)  # an agent runs
    refused = runner.invoke(app, ["db", "restore", str(latest), *opts])
    assert refused.exit_code == 1 and "agent stopped" in refused.output
    held.release()
    restored = runner.invoke(app, ["db", "restore", str(latest), *opts])
    assert restored.exit_code == 0 and "replaced-" in restored.output, restored.output
    assert runner.invoke(app, ["db", "check", *opts]).exit_code == 0


# ----------------------------------------------------------------------------- history


def test_transitions_per_vm_are_bounded(tmp_path: Path) -> None:
    db = Database(tmp_path / "s.db")
    store = VMStore(db, max_transitions=10)
    store.insert(VM("a" * 16, "web", VMSpec(name="web", kernel="/k"), VMState.STOPPED, "", T0, T0))
    state = VMState.STOPPED
    for i in range(25):
        new = VMState.STARTING if state == VMState.STOPPED else VMState.STOPPED
        assert store.compare_and_set_state("a" * 16, state, new, f"step {i}", T0)
        state = new
    rows = db.query("SELECT reason FROM transitions WHERE vm_id = ? ORDER BY id", ("a" * 16,))
    assert len(rows) == 10 and rows[-1]["reason"] == "step 24"


def test_runs_per_schedule_are_bounded(tmp_path: Path) -> None:
    from stoker.domain.schedules import ScheduleRecord

    db = Database(tmp_path / "s.db")
    store = ScheduleStore(db, max_runs=10)
    store.insert(
        ScheduleRecord(
            id="s1",
            name=None,
            action="start",
            vm="web",
            selector=None,
            cron="@hourly",
            tz="UTC",
            spread_s=0,
            grace_s=600.0,
            options={},
            enabled=True,
            created_at=T0,
            updated_at=T0,
            last_fire_at=T0,
        )
    )
    for i in range(30):
        store.record("s1", "skipped", T0 + timedelta(hours=i), f"run {i}")
    assert [r.message for r in store.runs("s1", 100)][:1] == ["run 29"]
    assert len(store.runs("s1", 100)) == 10


def test_reports_are_kept_by_period(tmp_path: Path) -> None:
    db = Database(tmp_path / "s.db")
    clock = lambda: datetime(2026, 3, 20, tzinfo=UTC)  # noqa: E731
    reports = ReportGenerator(db, tmp_path, UTC, None, clock=clock, keep={"daily": 3})
    for day in range(1, 8):
        reports._generate(reports.period("daily", datetime(2026, 3, day).date()))
    reports._generate(reports.period("weekly", datetime(2026, 3, 1).date()))
    labels = sorted(p.stem for p in (tmp_path / "reports").glob("*.json"))
    assert labels == ["daily-2026-03-05", "daily-2026-03-06", "daily-2026-03-07", "weekly-2026-W09"]


def test_a_log_held_open_with_o_append_rotates_in_place(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    writer = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # as the VMM holds it
    os.write(writer, b"a" * 100_000)
    assert rotate_if_over(log, 64 * 1024)
    os.write(writer, b"after\n")  # the writer goes on through its old descriptor
    os.close(writer)
    assert log.read_bytes() == b"after\n"  # from zero: no hole where the old bytes were
    assert (tmp_path / "console.log.1").read_bytes() == b"a" * 100_000
    assert not rotate_if_over(log, 64 * 1024)


# ----------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("spec.json", b"\xff\xfe{}", "not UTF-8"),
        ("spec.json", b"5", "must hold a JSON object"),
        ("spec.json", b'{"vcpus": NaN}', "NaN is not a number"),
        ("spec.json", b'{"boot_timeout_s": 1e400}', "boot_timeout_s is inf"),
        ("spec.toml", b"boot_timeout_s = nan\n", "boot_timeout_s is nan"),
        ("spec.toml", b"boot_timeout_s = inf\n", "boot_timeout_s is inf"),
        ("spec.toml", b"[labels]\nwhen = 2026-01-01T00:00:00Z\n", "labels.when is a date"),
        ("spec.toml", b"kernel = \n", "not valid TOML"),
    ],
)
def test_spec_file_errors_are_one_clear_line(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    result = CliRunner().invoke(
        app, ["--socket", str(tmp_path / "none.sock"), "vm", "create", "web", "-f", str(path)]
    )
    assert result.exit_code == 1, result.output
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_the_cli_takes_no_token_argument(tmp_path: Path) -> None:
    runner = CliRunner()
    refused = runner.invoke(app, ["--token", "x" * 32, "version"])
    assert refused.exit_code != 0
    token = tmp_path / "token"
    token.write_text("")
    empty = runner.invoke(
        app, ["--url", "http://127.0.0.1:9", "--token-file", str(token), "vm", "list"]
    )
    assert empty.exit_code == 1 and "is empty" in empty.output


def test_the_agent_command_checks_its_data_dir_option(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["agent", "--data-dir", "/" + "d" * 120])
    assert result.exit_code == 1 and "longer than" in result.output


def test_json_decoding_of_backup_events_is_plain(tmp_path: Path) -> None:
    # a backup's event carries its path as plain JSON (what `stoker events` shows)
    db_path = tmp_path / "stoker.db"
    _db_with_vm(db_path)
    path = backup.take_backup(db_path, tmp_path, keep=1)
    assert json.loads(json.dumps({"path": str(path)}))["path"].endswith(".db")
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


async def test_a_full_data_disk_is_a_507_not_a_500(tmp_path: Path) -> None:
    import httpx

    from stoker.agent import build_services
    from stoker.api.app import create_app

    db = Database(tmp_path / "stoker.db")
    services = build_services(AgentConfig(data_dir=tmp_path), db, drivers={"qemu": FakeDriver()})

    def full(*args: object, **kwargs: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    services.directory.store.insert = full  # type: ignore[method-assign]
    transport = httpx.ASGITransport(app=create_app(services), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://stoker") as api:
        answer = await api.post("/api/v1/vms", json={"name": "web", "kernel": "/k"})
    assert answer.status_code == 507
    assert answer.headers["content-type"] == "application/problem+json"
    assert "data disk is full" in answer.json()["detail"]
    db.close()


async def test_backups_run_at_start_and_failures_are_events(tmp_path: Path) -> None:
    from stoker.services.backups import DatabaseBackups
    from stoker.services.events import EventBus
    from stoker.store.events import EventStore

    db_path = tmp_path / "stoker.db"
    _db_with_vm(db_path)
    db = Database(db_path)
    events = EventBus(EventStore(db))
    backups = DatabaseBackups(db_path, tmp_path, DatabaseConfig(backup_keep=2), events)
    assert await backups.backup_now() is not None
    backups.db_path = tmp_path / "missing" / "stoker.db"
    assert await backups.backup_now() is None
    await events.drain()
    types = [r["type"] for r in db.query("SELECT type FROM events ORDER BY id")]
    assert types == ["database.backed_up", "database.backup_failed"]
    db.close()


def test_a_booting_vms_console_rotates_only_far_past_its_cap(tmp_path: Path) -> None:
    from stoker.services.directory import VMDirectory
    from stoker.services.history import BOOT_SLACK, HistoryConfig, LogRotation

    db = Database(tmp_path / "s.db")
    store = VMStore(db)
    spec = VMSpec(name="web", kernel="/k")
    store.insert(VM("a" * 16, "web", spec, VMState.STARTING, "", T0, T0))
    directory = VMDirectory(store, tmp_path)
    console = directory.paths("a" * 16).console
    console.parent.mkdir(parents=True)
    cap = 64 * 1024
    rotation = LogRotation(directory, HistoryConfig(console_log_max_bytes=cap))
    console.write_bytes(b"x" * (cap + 1))
    assert rotation.check_once() == []  # booting: the driver still reads it for its marker
    console.write_bytes(b"x" * (cap * BOOT_SLACK + 1))
    assert rotation.check_once() == [console]
