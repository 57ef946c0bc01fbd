"""Snapshots end to end: a real agent, real QEMU guests (TCG), real files on disk."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from stoker.client import StokerError
from stoker.wire import VMOut
from tests.agents.slow_save import DELAY_ENV
from tests.helpers import AgentProcess, free_port, guest_spec, http_get, pid_alive, wait_for

pytestmark = pytest.mark.integration


def boot_with_disk(agent: AgentProcess, name: str) -> tuple[VMOut, int]:
    disk = agent.images / f"{name}.raw"
    with open(disk, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    port = free_port()
    spec = guest_spec(name, port, drives=[{"path": str(disk), "format": "raw"}])
    spec["cmdline"] += " stoker.mkfs=1"
    with agent.client() as api:
        api.create_vm(spec)
        vm = api.start_vm(name, wait=True, timeout_s=90)
    assert vm.state == "running", vm
    assert wait_for(lambda: http_get(f"http://127.0.0.1:{port}/health"), 30)
    return vm, port


def marker(port: int, where: str = "data") -> str | None:
    answer = http_get(f"http://127.0.0.1:{port}/cgi-bin/read-marker?where={where}", timeout=2)
    return answer[1].strip() if answer and answer[0] == 200 else None


def write_marker(port: int, value: str) -> str:
    answer = http_get(f"http://127.0.0.1:{port}/cgi-bin/write-marker?value={value}", timeout=5)
    assert answer and answer[0] == 200, answer
    return answer[1].strip()


def snapshot_dirs(agent: AgentProcess, vm_id: str) -> list[str]:
    root = agent.data_dir / "vms" / vm_id / "snapshots"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def test_snapshot_restore_verify_prune(agent):
    vm, port = boot_with_disk(agent, "web")
    assert write_marker(port, "A") == "data", "the guest must have /data mounted"
    with agent.client() as api:
        snap = api.create_snapshot("web", tags=["before"])
        assert snap.with_memory and snap.kind == "manual" and snap.tags == ["before"]
        assert snap.pause_s is not None and snap.pause_s < 10
        assert api.get_vm("web").state == "running"
        assert marker(port) == "A", "the guest runs on after the snapshot"
        shown = api.get_snapshot(snap.id)
        names = {f.name for f in shown.files}
        assert names == {"memory", "spec.json", "disks/vd0.raw"}
        assert all(len(f.sha256) == 64 for f in shown.files)
        assert snapshot_dirs(agent, vm.id) == [snap.id]

        write_marker(port, "B")
        assert marker(port) == "B" and marker(port, "tmp") == "B"

        restored = api.restore_snapshot(snap.id)
        assert restored.vm.state == "running"
        assert restored.vm.state_reason == "guest ready"
        new_pid = api.get_vm("web").process.pid
        assert new_pid != vm.process.pid and not pid_alive(vm.process.pid)
        # the user-mode forward comes back with the new QEMU; both markers are from before
        assert wait_for(lambda: marker(port), 30) == "A"
        assert marker(port, "tmp") == "A"
        reasons = [t.reason for t in api.get_vm("web").transitions]
        assert f"restored from snapshot {snap.id}" in reasons

        checked = api.verify_snapshot(snap.id).last_verification
        assert checked.ok and not checked.deep, checked
        assert "3 files match" in checked.detail

        deep = api.verify_snapshot(snap.id, deep=True).last_verification
        assert deep.ok and deep.deep, deep
        assert "throwaway VM resumed from memory" in deep.detail
        # the original was never touched, and the throwaway is gone
        assert api.get_vm("web").process.pid == new_pid
        assert marker(port) == "A"
        assert snapshot_dirs(agent, vm.id) == [snap.id]
        assert api.get_snapshot(snap.id).last_verification.deep is True

        # a damaged snapshot fails verification and says which file
        second = api.create_snapshot("web")
        memory = Path(agent.data_dir / "vms" / vm.id / "snapshots" / second.id / "memory")
        with open(memory, "r+b") as f:
            f.seek(4096)
            byte = f.read(1)
            f.seek(4096)
            f.write(bytes([byte[0] ^ 0xFF]))
        bad = api.verify_snapshot(second.id).last_verification
        assert not bad.ok and "memory checksum mismatch" in bad.detail

        # retention: the first is protected, keep only the newest other one
        api.protect_snapshot(snap.id)
        with pytest.raises(StokerError) as info:
            api.delete_snapshot(snap.id)
        assert info.value.status == 409 and "unprotect" in info.value.detail
        third = api.create_snapshot("web")
        policy = api.set_snapshot_policy("web", "last:1")
        assert policy.retention == "last:1"
        plan = api.prune_snapshots("web", dry_run=True)
        assert [i.id for i in plan.remove] == [second.id]
        assert {i.id: i.reasons for i in plan.keep} == {
            snap.id: ["protected"],
            third.id: ["last 1"],
        }
        assert len(snapshot_dirs(agent, vm.id)) == 3, "a dry run removes nothing"
        used_before = _du(agent.data_dir / "vms" / vm.id / "snapshots")
        pruned = api.prune_snapshots("web")
        assert [i.id for i in pruned.remove] == [second.id]
        assert pruned.freed_bytes > 60 * 1024 * 1024
        assert snapshot_dirs(agent, vm.id) == sorted([snap.id, third.id])
        used_after = _du(agent.data_dir / "vms" / vm.id / "snapshots")
        assert used_before - used_after >= pruned.freed_bytes * 0.9
        assert [s.id for s in api.list_snapshots("web")] == [snap.id, third.id]
        events = [e for e in _events(agent) if "pruned" in e]
        assert any(second.id in e for e in events)

        # automatic snapshot + prune by policy: the auto one is the new "last 1"
        auto = api.auto_snapshot("web")
        assert auto.snapshot.kind == "auto"
        assert [i.id for i in auto.prune.remove] == [third.id]
        assert sorted(snapshot_dirs(agent, vm.id)) == sorted([snap.id, auto.snapshot.id])
        assert api.get_vm("web").state == "running"


def _du(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            total += os.stat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def _events(agent: AgentProcess) -> list[str]:
    import sqlite3

    conn = sqlite3.connect(agent.data_dir / "stoker.db")
    try:
        return [row[0] for row in conn.execute("SELECT message FROM events ORDER BY id")]
    finally:
        conn.close()


def test_sigkill_during_snapshot_leaves_no_partial_snapshot(guest):
    # the test-only agent holds the guest paused for 5 s once its memory is saved
    agent = AgentProcess(module="tests.agents.slow_save", env={DELAY_ENV: "5"}).start()
    try:
        vm, port = boot_with_disk(agent, "crashy")
        write_marker(port, "A")
        errors: list[Exception] = []

        def take() -> None:
            try:
                with agent.client() as api:
                    api.create_snapshot("crashy")
            except Exception as exc:  # the agent dies under it
                errors.append(exc)

        worker = threading.Thread(target=take)
        worker.start()
        snapdir = agent.data_dir / "vms" / vm.id / "snapshots"
        wait_for(
            lambda: (
                snapdir.is_dir() and any((p / "memory").exists() for p in snapdir.glob(".tmp-*"))
            ),
            30,
        )
        time.sleep(0.3)  # memory saved, guest paused (postmigrate), disks not copied yet
        agent.signal(signal.SIGKILL)
        worker.join(30)
        assert errors, "the request cannot have succeeded"
        assert pid_alive(vm.process.pid), "killing the agent never kills the VM"

        agent.start()
        with agent.client() as api:
            assert api.list_snapshots("crashy") == []
            assert snapshot_dirs(agent, vm.id) == []
            shown = api.get_vm("crashy")
            assert shown.state == "running"
            assert shown.process.pid == vm.process.pid
        # the guest that was left paused by the interrupted snapshot runs again
        assert wait_for(lambda: marker(port), 30) == "A"
        messages = _events(agent)
        assert any("removed interrupted snapshot" in m for m in messages)
        assert any("resumed after an interrupted snapshot" in m for m in messages)
    finally:
        agent.cleanup()


def test_snapshot_refused_when_disk_space_is_short(guest):
    agent = AgentProcess(env={"STOKER_SNAPSHOTS__MARGIN_MIB": str(1 << 40)}).start()
    try:
        with agent.client() as api:
            vm = api.create_vm(guest_spec("tight"))
            with pytest.raises(StokerError) as info:
                api.create_snapshot("tight")
            assert info.value.status == 409
            assert "not enough free disk space" in info.value.detail
            assert info.value.body["free_bytes"] > 0
            assert api.list_snapshots() == []
        assert snapshot_dirs(agent, vm.id) == []
    finally:
        agent.cleanup()
