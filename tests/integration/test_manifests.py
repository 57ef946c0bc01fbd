"""Manifests against a real agent process, real SQLite and real QEMU guests: plan and apply
through the CLI, a quota changed live, memory only with --restart, prune, every kind of error
with its file, key path and line, an agent killed mid-apply, and an agent keeping a file
applied (``stoker agent --manifest``)."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from stoker.cli.main import app
from stoker.client import Client, StokerError, manifest_problems
from stoker.host.cgroups import CgroupMode, detect
from stoker.services.networks.config import default_state_dir
from stoker.wire import ManifestFile
from tests import netns as tn
from tests.helpers import AgentProcess, guest_image, guest_spec, wait_for

pytestmark = pytest.mark.integration
runner = CliRunner()


def vm_table(
    name: str,
    *,
    memory: int = 128,
    running: bool | None = None,
    extra: str = "",
    network: str | None = 'network = { mode = "none" }',
) -> str:
    image = guest_image()
    lines = [
        "[[vm]]",
        f'name = "{name}"',
        f"memory_mib = {memory}",
        f'kernel = "{image.kernel}"',
        f'initrd = "{image.initrd}"',
        f'cmdline = "{image.cmdline}"',
        f'ready_marker = "{image.ready_marker}"',
        'accel = "tcg"',
        "boot_timeout_s = 60",
        "stop_timeout_s = 10",
    ]
    if network is not None:
        lines.append(network)
    if running is not None:
        lines.append(f"running = {str(running).lower()}")
    return "\n".join(lines) + "\n" + extra + "\n"


def host_manifest(*, cpu: int = 100, web_memory: int = 128, with_db: bool = True) -> str:
    text = f"""[defaults]
quota = {{ cpu_percent = {cpu} }}
snapshot_policy = {{ retention = "daily:7,weekly:4", interval = "1d" }}

"""
    text += vm_table("web", memory=web_memory, running=True, extra='labels = { tier = "web" }')
    text += '[[vm.schedules]]\naction = "stop"\ncron = "0 18 * * *"\n\n'
    if with_db:
        text += vm_table("db", extra='labels = { tier = "db" }')
    text += '[[schedule]]\nname = "nightly"\naction = "snapshot"\n'
    text += 'selector = { tier = "web" }\ncron = "30 2 * * *"\n'
    return text


def stoker(agent: AgentProcess, *args: str) -> Any:
    return runner.invoke(app, ["--socket", str(agent.socket), *args])


def cpu_quota_us(parent: str, vm_id: str) -> int | None:
    if detect() is not CgroupMode.V1:
        return None
    return int(Path(f"/sys/fs/cgroup/cpu/{parent}/{vm_id}/cpu.cfs_quota_us").read_text())


def events(agent: AgentProcess, type_: str) -> list[dict[str, Any]]:
    conn = sqlite3.connect(f"file:{agent.data_dir / 'stoker.db'}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT message, data FROM events WHERE type = ?", (type_,)).fetchall()
    finally:
        conn.close()
    return [{"message": m, **json.loads(d)} for m, d in rows]


def line(text: str, needle: str) -> int:
    """The 1-based line of the first line of ``text`` that contains ``needle``."""
    return next(i for i, text_line in enumerate(text.splitlines(), 1) if needle in text_line)


def running(api: Client, name: str) -> Any:
    vm = api.get_vm(name)
    return vm if vm.state == "running" else None


# --------------------------------------------------------------------------- plan and apply


@pytest.fixture
def booting_agent(guest: Any) -> Iterator[AgentProcess]:
    """An agent whose VMs' cgroups live under a parent of their own, removed afterwards."""
    parent = "stoker-mtest-" + uuid.uuid4().hex[:8]
    agent = AgentProcess(env={"STOKER_QUOTAS__CGROUP_PARENT": parent})
    try:
        yield agent.start()
    finally:
        agent.cleanup()
        remove_cgroups(parent)


def remove_cgroups(parent: str) -> None:
    """The parent and its VMs' cgroups; a killed VMM leaves its cgroup only once it is
    reaped (PID 1 here takes a second or two), so each removal is retried a while."""
    root = Path("/sys/fs/cgroup")
    bases = [root / c / parent for c in ("cpu", "cpuacct", "memory", "blkio")] + [root / parent]
    for base in (b for b in bases if b.is_dir()):
        for directory in [*(c for c in base.iterdir() if c.is_dir()), base]:
            with contextlib.suppress(TimeoutError):
                wait_for(lambda d=directory: _rmdir(d), 5, 0.1)


def _rmdir(directory: Path) -> bool:
    try:
        directory.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def test_plan_apply_quota_live_memory_on_restart_and_prune(
    booting_agent: AgentProcess, tmp_path: Path
) -> None:
    agent = booting_agent
    path = tmp_path / "host.toml"
    path.write_text(host_manifest())
    planned = stoker(agent, "plan", "-f", str(path))
    assert planned.exit_code == 2, planned.output
    assert "+ vm web" in planned.output and "> vm web" in planned.output

    applied = stoker(agent, "apply", "-f", str(path))
    assert applied.exit_code == 0, applied.output
    assert "Applied: 9 steps done." in applied.output
    with agent.client() as api:
        assert {vm.name for vm in api.list_vms()} == {"web", "db"}
        web = wait_for(lambda: running(api, "web"), 60)
        assert api.get_vm("db").state == "pending"
        assert api.get_quota("db").override == {"cpu_percent": 100}
        assert api.get_snapshot_policy("web").retention == "daily:7,weekly:4"
        assert {"nightly", "web-stop"} <= {s.name for s in api.list_schedules()}
    again = stoker(agent, "plan", "-f", str(path))
    assert again.exit_code == 0 and "No changes" in again.output, again.output

    # one quota changed: live, the VMM keeps running
    path.write_text(host_manifest(cpu=150))
    assert stoker(agent, "apply", "-f", str(path)).exit_code == 0
    with agent.client() as api:
        quota = api.get_quota("web")
        now = api.get_vm("web")
    assert quota.limits["cpu_percent"].value == 150
    assert quota.limits["cpu_percent"].status == "enforced", quota.limits
    assert cpu_quota_us(agent.env["STOKER_QUOTAS__CGROUP_PARENT"], web.id) in (None, 150_000)
    assert now.process is not None and web.process is not None
    assert (now.state, now.process.pid) == ("running", web.process.pid)

    # memory needs a restart: pending without --restart, done with it
    path.write_text(host_manifest(cpu=150, web_memory=160))
    plan_restart = stoker(agent, "plan", "-f", str(path), "--restart")
    assert plan_restart.exit_code == 2
    assert "to update with restart" in plan_restart.output
    assert "restart for memory_mib" in plan_restart.output
    pending = stoker(agent, "apply", "-f", str(path))
    assert pending.exit_code == 0 and "still need a restart" in pending.output, pending.output
    with agent.client() as api:
        vm = api.get_vm("web")
        assert vm.spec.memory_mib == 128 and vm.process and vm.process.pid == web.process.pid
    assert stoker(agent, "plan", "-f", str(path)).exit_code == 2  # still pending
    assert stoker(agent, "apply", "-f", str(path), "--restart").exit_code == 0
    with agent.client() as api:
        restarted = wait_for(lambda: running(api, "web"), 60)
    assert restarted.spec.memory_mib == 160 and restarted.process.pid != web.process.pid
    assert stoker(agent, "plan", "-f", str(path), "--restart").exit_code == 0

    # prune: db goes, a VM made by hand stays
    with agent.client() as api:
        api.create_vm(guest_spec("by-hand"))
    path.write_text(host_manifest(cpu=150, web_memory=160, with_db=False))
    kept = stoker(agent, "plan", "-f", str(path))
    assert kept.exit_code == 0 and "(apply --prune deletes them): vm db" in kept.output
    pruned = stoker(agent, "apply", "-f", str(path), "--prune")
    assert pruned.exit_code == 0 and "- vm db" in pruned.output, pruned.output
    with agent.client() as api:
        assert {vm.name for vm in api.list_vms()} == {"web", "by-hand"}
        shown = api.get_manifest()
    assert stoker(agent, "plan", "-f", str(path), "--prune").exit_code == 0
    assert shown.files == [ManifestFile(name=str(path), content=path.read_text())]
    assert len(events(agent, "manifest.applied")) == 5


# --------------------------------------------------------------------------- errors


def test_every_kind_of_error_names_file_key_and_line_and_changes_nothing(
    agent: AgentProcess, tmp_path: Path
) -> None:
    def problems(files: dict[str, str]) -> list[tuple[str, int, str, str]]:
        with agent.client() as api, pytest.raises(StokerError) as info:
            api.apply_manifest([ManifestFile(name=n, content=c) for n, c in files.items()])
        assert info.value.status == 422
        return [(p.file, p.line, p.field, p.message) for p in manifest_problems(info.value)]

    # syntax: TOML that does not parse, in the second file
    found = problems({"a.toml": vm_table("a"), "b.toml": "[[vm]]\nname = 'b'\nmemory_mib = \n"})
    assert [(f, line) for f, line, _, _ in found] == [("b.toml", 3)]
    assert "not valid TOML" in found[0][3]

    # validation: unknown key, wrong type, reference to nothing, across two files
    vms = vm_table("web", extra="quota = { cpu = 200 }")
    more = vm_table("db").replace("memory_mib = 128", 'memory_mib = "128"')
    more += '[[schedule]]\nname = "s"\naction = "start"\nvm = "nope"\ncron = "0 8 * * *"\n'
    where = {(f, n, key): why for f, n, key, why in problems({"vms.toml": vms, "more.toml": more})}
    assert len(where) == 3
    assert "unknown key 'cpu'" in where[("vms.toml", line(vms, "quota ="), "vm[web].quota.cpu")]
    assert "integer" in where[("more.toml", line(more, "memory_mib"), "vm[db].memory_mib")]
    missing = where[("more.toml", line(more, 'vm = "nope"'), "schedule[s].vm")]
    assert "no [[vm]] named 'nope'" in missing

    # what this host refuses: a kernel outside every image pool, a quota it cannot enforce
    outside = vm_table("web").replace(str(guest_image().kernel), "/srv/elsewhere/vmlinuz")
    host = outside + vm_table("db", extra="quota = { network_mbps = 10 }")
    where = {(f, n, key): why for f, n, key, why in problems({"host.toml": host})}
    assert set(where) == {
        ("host.toml", line(host, "/srv/elsewhere"), "vm[web].kernel"),
        ("host.toml", line(host, "network_mbps"), "vm[db].quota.network_mbps"),
    }

    # the CLI prints each as file:line: key: message, and exits 1
    path = tmp_path / "broken.toml"
    path.write_text(outside)
    shown = stoker(agent, "plan", "-f", str(path))
    assert shown.exit_code == 1
    assert f"{path}:{line(outside, '/srv/')}: vm[web].kernel: " in shown.output, shown.output

    with agent.client() as api:  # nothing was changed by any of them
        assert api.list_vms() == []
        assert api.get_manifest().manifest_hash is None
        assert all(s.name == "daily-report" for s in api.list_schedules())
    assert events(agent, "vm.created") == []


# --------------------------------------------------------------------------- crash safety


def test_an_agent_killed_mid_apply_converges_on_the_next_apply(tmp_path: Path) -> None:
    names = [f"vm-{i}" for i in range(4)]
    text = '[defaults]\nquota = { cpu_percent = 50 }\nsnapshot_policy = { retention = "daily:3" }\n'
    for name in names:
        text += vm_table(name) + '[[vm.schedules]]\naction = "start"\ncron = "0 8 * * *"\n\n'
    files = [ManifestFile(name="host.toml", content=text)]
    slow = AgentProcess(module="tests.agents.slow_apply", env={"SLOW_APPLY_DELAY_S": "0.3"})
    try:
        slow.start()
        failures: list[BaseException] = []

        def apply() -> None:
            try:
                with slow.client() as api:
                    api.apply_manifest(files)
            except BaseException as exc:  # the agent dies under it
                failures.append(exc)

        thread = threading.Thread(target=apply)
        thread.start()

        def managed_rows() -> int:
            conn = sqlite3.connect(f"file:{slow.data_dir / 'stoker.db'}?mode=ro", uri=True)
            try:
                return int(conn.execute("SELECT COUNT(*) FROM manifest_objects").fetchone()[0])
            finally:
                conn.close()

        wait_for(lambda: managed_rows() >= 6, 30)  # 4 VMs and 2 quotas of 16 steps
        slow.signal(signal.SIGKILL)
        thread.join(10)
        assert failures, "the apply should have been cut short"

        agent = AgentProcess(data_dir=slow.data_dir).start()
        with agent.client() as api:
            shown = api.get_manifest()
            assert shown.applying_hash is not None and shown.manifest_hash is None
            rest = api.plan_manifest(files)
            assert rest.drift == []  # what was done is recorded, not taken for hand changes
            assert not any(s.op == "create" and s.kind == "vm" for s in rest.steps)
            assert 0 < len(rest.steps) < 16
            api.apply_manifest(files)
            assert api.plan_manifest(files).exit_code == 0
            vms = api.list_vms()
            schedules = [s.name for s in api.list_schedules()]
            assert sorted(vm.name for vm in vms) == names  # nothing twice
            assert sorted(s for s in schedules if s.startswith("vm-")) == [
                f"{n}-start" for n in names
            ]
            assert all(api.get_quota(n).override == {"cpu_percent": 50} for n in names)
            assert api.get_manifest().applying_hash is None
        agent.stop()
    finally:
        slow.cleanup()


# --------------------------------------------------------------------------- --manifest


def test_the_agent_keeps_its_manifest_file_applied(tmp_path: Path) -> None:
    directory = tmp_path / "manifests"
    directory.mkdir()
    path = directory / "host.toml"
    path.write_text(vm_table("one", extra="quota = { cpu_percent = 100 }"))
    agent = AgentProcess(env={"STOKER_MANIFEST__PATH": str(path)})
    try:
        agent.start()
        with agent.client() as api:
            wait_for(lambda: [vm.name for vm in api.list_vms()] == ["one"], 10)
            assert api.get_manifest().watching == str(path)

            # an edit changes the host within a few seconds
            began = time.monotonic()
            path.write_text(
                vm_table("one", extra="quota = { cpu_percent = 200 }") + vm_table("two")
            )
            wait_for(lambda: {vm.name for vm in api.list_vms()} == {"one", "two"}, 10)
            took = time.monotonic() - began
            assert api.get_quota("one").override == {"cpu_percent": 200}
            assert took < 5, took

            # a broken edit is refused with an event; the host stays as it was
            path.write_text(vm_table("one", extra="quota = { cpu = 300 }") + vm_table("three"))
            wait_for(lambda: events(agent, "manifest.refused"), 10)
            refused = events(agent, "manifest.refused")[-1]
            assert refused["problems"][0]["path"] == "vm[one].quota.cpu"
            assert refused["problems"][0]["line"] == 12  # the [[vm]]'s quota = line
            assert {vm.name for vm in api.list_vms()} == {"one", "two"}
            assert api.get_quota("one").override == {"cpu_percent": 200}

            # the file owns the host: apply requests are refused, plans are answered
            files = [ManifestFile(name="other.toml", content=vm_table("four"))]
            with pytest.raises(StokerError) as info:
                api.apply_manifest(files)
            assert info.value.status == 409 and "edit that file" in info.value.detail
            assert api.plan_manifest(files).exit_code == 2

            # fixed again: applied (without prune, "two" stays)
            path.write_text(vm_table("one") + vm_table("three"))
            wait_for(lambda: "three" in {vm.name for vm in api.list_vms()}, 10)
            assert api.get_quota("one").override == {}
            assert len(events(agent, "manifest.applied")) == 3
    finally:
        agent.cleanup()


# --------------------------------------------------------------------------- networks


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "host.toml"


def test_networks_and_the_example_on_an_agent_with_managed_networking(tmp_path: Path) -> None:
    with tn.namespaces("m") as (host,):
        agent = AgentProcess(wrapper=["nsenter", f"--net=/run/netns/{host.name}"])
        try:
            agent.start()
            # the README's example passes every check this host makes
            planned = stoker(agent, "plan", "-f", str(EXAMPLE))
            assert planned.exit_code == 2, planned.output
            assert "+ vm web-server" in planned.output
            assert "~ schedule daily-report  (created by hand: apply takes it over)" in (
                planned.output
            )

            path = tmp_path / "net.toml"
            lab = '[[network]]\nname = "lab"\nsubnet = "10.77.0.0/24"\nisolation = "open"\n\n'
            path.write_text(lab + vm_table("on-lab", network='network_name = "lab"'))
            applied = stoker(agent, "apply", "-f", str(path))
            assert applied.exit_code == 0, applied.output
            with agent.client() as api:
                net = api.get_network("lab")
                assert (net.subnet, net.managed_by) == ("10.77.0.0/24", "manifest")
                vm = api.get_vm("on-lab")
                assert (vm.spec.network.mode, vm.spec.network.name) == ("managed", "lab")
                api.create_network("by-hand", "10.78.0.0/24")
            assert stoker(agent, "plan", "-f", str(path)).exit_code == 0

            path.write_text(vm_table("other"))
            pruned = stoker(agent, "apply", "-f", str(path), "--prune")
            assert pruned.exit_code == 0, pruned.output
            out = pruned.output
            assert out.index("- vm on-lab") < out.index("- network lab"), out
            with agent.client() as api:
                assert {n.name for n in api.list_networks()} == {"by-hand"}
                assert {v.name for v in api.list_vms()} == {"other"}
        finally:
            agent.cleanup()
            shutil.rmtree(default_state_dir(agent.data_dir), ignore_errors=True)
