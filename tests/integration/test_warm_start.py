"""Warm start on real guests: the boot snapshot, every start path resuming it, and every way
it can stop applying falling back to a cold boot.

The test guest records its boot id before it prints its ready marker (so before the boot
snapshot is taken): a warm-started guest shows the boot id of the boot the snapshot came
from, a cold boot a new one. Its guest agent steps its clock on ``guest-set-time`` and runs
its resume hooks, which count resumes (``/cgi-bin/clock`` shows all three).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stoker.cli.main import app
from stoker.client import Client, StokerError
from stoker.wire import ManifestFile
from tests.agents.slow_save import DELAY_ENV
from tests.helpers import AgentProcess, free_port, guest_image, guest_spec, http_get, wait_for


def clock(port: int) -> dict[str, str] | None:
    answer = http_get(f"http://127.0.0.1:{port}/cgi-bin/clock", 1.0)
    if answer is None or answer[0] != 200:
        return None
    return dict(line.split(" ", 1) for line in answer[1].splitlines())


def events(api: Client, name: str, kind: str) -> list[str]:
    return [e.message for e in api.events(vm=name, type=kind, limit=1000)]


def warm_vm(api: Client, name: str, port: int, **fields: object) -> float:
    """Create a warm-start VM and boot it cold once, until its boot snapshot is saved;
    return how long that cold start took (to ``running``), the yardstick for warm ones."""
    api.create_vm(guest_spec(name, port, warm_start=True, **fields))
    began = time.monotonic()
    assert api.start_vm(name).state == "running"
    cold = time.monotonic() - began
    wait_for(lambda: events(api, name, "vm.boot_snapshot_saved"), 30)
    return cold


def test_a_warm_start_is_the_snapshot_its_clock_is_right_and_it_is_told(agent):
    port = free_port()
    with agent.client() as api:
        cold = warm_vm(api, "warm", port)
        first = wait_for(lambda: clock(port), 30)
        assert first["resumed"] == "0"
        shown = api.get_vm("warm").boot_snapshot
        assert shown is not None and shown.ready and shown.size_bytes > 1 << 20
        said = CliRunner().invoke(
            app, ["vm", "show", "warm"], env={"STOKER_SOCKET": str(agent.socket)}
        )
        assert said.exit_code == 0, said.output
        assert "warm start on; boot snapshot ready (" in " ".join(said.output.split())
        api.stop_vm("warm", graceful=False)
        time.sleep(2.5)  # a clock that had stopped at the snapshot would be seconds behind

        began = time.monotonic()
        vm = api.start_vm("warm")
        took = time.monotonic() - began
        assert vm.state == "running", vm.state_reason
        assert events(api, "warm", "vm.warm_start"), "the start resumed the boot snapshot"
        again = wait_for(lambda: clock(port), 10)
        assert again["boot_id"] == first["boot_id"], "it really is the snapshot's boot"
        # the guest agent steps the clock at the next whole second, then runs the hooks
        told = wait_for(lambda: (c := clock(port)) and c["resumed"] == "1" and c, 5)
        assert abs(int(told["time"]) - time.time()) <= 1.0
        # the figures are bench/warmstart.py's; here only "faster than its own cold boot"
        assert took < cold, f"a warm start took {took:.2f} s, the cold one {cold:.2f} s"


def test_a_changed_boot_input_or_a_damaged_snapshot_boots_cold(agent):
    port = free_port()
    initrd = agent.images / "initrd.img"
    initrd.write_bytes(Path(guest_spec("x")["initrd"]).read_bytes())
    with agent.client() as api:
        warm_vm(api, "cold", port, initrd=str(initrd))
        boot = wait_for(lambda: clock(port), 30)["boot_id"]
        api.stop_vm("cold", graceful=False)
        # what the VM boots from changes (trailing zeros after a cpio archive are ignored by
        # the kernel, so the guest still boots): the boot snapshot no longer applies
        with open(initrd, "ab") as f:
            f.write(bytes(512))
        assert api.start_vm("cold").state == "running"
        discarded = events(api, "cold", "vm.boot_snapshot_discarded")
        assert any("initrd" in m and "starting cold" in m for m in discarded), discarded
        assert wait_for(lambda: clock(port), 30)["boot_id"] != boot, "a cold boot"
        # the cold boot took a new one; damage it: the start falls back to a cold boot
        wait_for(lambda: len(events(api, "cold", "vm.boot_snapshot_saved")) == 2, 30)
        api.stop_vm("cold", graceful=False)
        state = agent.data_dir / "vms" / api.get_vm("cold").id / "warm" / "state"
        with open(state, "r+b") as f:
            f.seek(state.stat().st_size // 2)
            f.write(b"\xff" * 4096)
        vm = api.start_vm("cold")
        assert vm.state == "running", vm.state_reason
        discarded = events(api, "cold", "vm.boot_snapshot_discarded")
        assert any("checksum" in m for m in discarded), discarded
        assert wait_for(lambda: clock(port), 30)


def test_writable_drives_and_warm_start_do_not_go_together(agent):
    disk = agent.images / "data.img"
    disk.write_bytes(bytes(1 << 20))
    with agent.client() as api, pytest.raises(StokerError) as info:
        api.create_vm(guest_spec("rw", warm_start=True, drives=[{"path": str(disk)}]))
    assert info.value.status == 422
    assert {e["field"] for e in info.value.body["errors"]} == {"drives[0].read_only"}
    with agent.client() as api:
        spec = guest_spec("ro", warm_start=True, drives=[{"path": str(disk), "read_only": True}])
        assert api.create_vm(spec).spec.warm_start is True


def test_recovery_and_a_schedule_take_the_warm_path(agent):
    port = free_port()
    with agent.client() as api:
        cold = warm_vm(
            api, "svc", port, restart={"policy": "on-failure", "backoff_initial_s": 0.05}
        )
        boot = wait_for(lambda: clock(port), 30)["boot_id"]
        vm = api.get_vm("svc")
        assert vm.process is not None
        # the VMM dies: the automatic restart resumes the boot snapshot
        began = time.monotonic()
        os.kill(vm.process.pid, signal.SIGKILL)
        back = wait_for(lambda: (c := clock(port)) and c["boot_id"] == boot and c, 30)
        recovered = time.monotonic() - began
        assert back["boot_id"] == boot
        assert len(events(api, "svc", "vm.warm_start")) == 1
        assert recovered < cold, f"recovery took {recovered:.2f} s, a cold start {cold:.2f} s"
        # a schedule's start: stopped, then the schedule runs it
        api.stop_vm("svc", graceful=False)
        row = api.create_schedule("start", "0 8 * * 1-5", vm="svc", name="morning")
        run = api.run_schedule(row.id, wait=True)
        assert run.status == "succeeded", run.message
        assert len(events(api, "svc", "vm.warm_start")) == 2
        assert wait_for(lambda: clock(port), 10)["boot_id"] == boot


def test_an_agent_killed_while_writing_a_boot_snapshot_leaves_none_or_a_whole_one(guest):
    agent = AgentProcess(module="tests.agents.slow_save", env={DELAY_ENV: "3"}).start()
    port = free_port()
    try:
        with agent.client() as api:
            api.create_vm(guest_spec("crash", port, warm_start=True))
            vm = api.start_vm("crash", wait=False)
            warm = agent.data_dir / "vms" / vm.id / "warm"
            # the memory is saved, the guest paused, the files not yet sealed
            wait_for(lambda: (warm.with_name("warm.tmp") / "state").exists(), 60)
            time.sleep(0.5)
        agent.signal(signal.SIGKILL)
        assert not (warm / "boot.json").exists() or (warm / "state").exists()
        agent.start()
        with agent.client() as api:
            assert not warm.with_name("warm.tmp").exists()
            assert api.get_vm("crash").state == "running"
            # the guest the crash left paused runs again, and answers
            assert wait_for(lambda: clock(port), 30)
            api.stop_vm("crash", graceful=False)
            # whatever is on disk now is whole: the next start works, warm or cold
            assert api.start_vm("crash").state == "running"
            assert wait_for(lambda: clock(port), 30)
    finally:
        agent.cleanup()


def manifest(name: str, port: int, memory_mib: int) -> list[ManifestFile]:
    image = guest_image()
    text = f"""
[[vm]]
name = "{name}"
kernel = "{image.kernel}"
initrd = "{image.initrd}"
cmdline = "{image.cmdline}"
ready_marker = "{image.ready_marker}"
accel = "tcg"
memory_mib = {memory_mib}
warm_start = true
network = {{ mode = "user", port_forwards = [{{ host_port = {port}, guest_port = 80 }}] }}
"""
    return [ManifestFile(name="vms.toml", content=text)]


def test_changing_the_memory_makes_the_next_start_cold_and_says_why(agent):
    port = free_port()
    with agent.client() as api:
        api.apply_manifest(manifest("grow", port, 128))
        assert api.start_vm("grow").state == "running"
        wait_for(lambda: events(api, "grow", "vm.boot_snapshot_saved"), 30)
        boot = wait_for(lambda: clock(port), 30)["boot_id"]
        api.stop_vm("grow", graceful=False)
        api.apply_manifest(manifest("grow", port, 192))
        assert api.get_vm("grow").spec.memory_mib == 192
        assert api.start_vm("grow").state == "running"
        discarded = events(api, "grow", "vm.boot_snapshot_discarded")
        assert any("(memory_mib)" in m for m in discarded), discarded
        assert not events(api, "grow", "vm.warm_start")
        assert wait_for(lambda: clock(port), 30)["boot_id"] != boot, "it booted cold"
