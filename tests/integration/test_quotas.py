"""Quotas that really bind, on real QEMU guests driven by a real agent process.

CPU: a guest busy loop measured from the VMM's /proc/<pid>/stat. Memory: the cgroup limit is
guest RAM plus overhead and the guest boots and runs under it. Disk: QEMU's own view of the
throttle and a guest doing direct I/O slowed to the limit. Network: an agent running inside a
network namespace created here, tc read back from the kernel.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stoker.cli.main import app as cli_app
from stoker.client import StokerError
from stoker.host import netlimits, tap
from stoker.host.cgroups import CgroupMode, detect
from stoker.wire import DriveThrottleOut, QuotaOut, VMOut
from tests.helpers import AgentProcess, free_port, guest_spec, http_get, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for cgroups, netns and tc"),
]
TICK = os.sysconf("SC_CLK_TCK")
MiB = 1024 * 1024
CG = Path("/sys/fs/cgroup")


def cpu_seconds(pid: int) -> float:
    raw = Path(f"/proc/{pid}/stat").read_text()
    rest = raw[raw.rindex(")") + 2 :].split()
    return (int(rest[11]) + int(rest[12])) / TICK  # utime + stime


def host_idle_ticks() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return fields[3] + fields[4], sum(fields)  # idle + iowait, total


def cpu_share(pid: int, seconds: float = 10.0) -> tuple[float, float]:
    """Fraction of one core the VMM used over ``seconds``, and the host's idle fraction."""
    before, started, (idle0, total0) = cpu_seconds(pid), time.monotonic(), host_idle_ticks()
    time.sleep(seconds)
    idle1, total1 = host_idle_ticks()
    share = (cpu_seconds(pid) - before) / (time.monotonic() - started)
    return share, (idle1 - idle0) / max(1, total1 - total0)


def cpu_throttled(parent: str, vm_id: str) -> int:
    if detect() is not CgroupMode.V1:
        return 0
    stat = (CG / "cpu" / parent / vm_id / "cpu.stat").read_text().split()
    return int(stat[stat.index("nr_throttled") + 1])


def get(url: str, timeout: float = 120) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        return answer.read().decode()


def events(agent: AgentProcess, type_: str) -> list[dict]:
    conn = sqlite3.connect(f"file:{agent.data_dir / 'stoker.db'}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT message, data FROM events WHERE type = ?", (type_,)).fetchall()
    finally:
        conn.close()
    return [{"message": m, **json.loads(d)} for m, d in rows]


def start(api, spec: dict) -> VMOut:
    api.create_vm(spec)
    vm = api.start_vm(spec["name"], wait=True, timeout_s=90)
    assert vm.state == "running", vm
    return vm


@pytest.fixture
def quota_agent(guest):
    parent = "stoker-qtest-" + uuid.uuid4().hex[:8]  # the configurable parent, ours alone
    proc = AgentProcess(
        env={
            "STOKER_QUOTAS__MONITOR_INTERVAL_S": "1",
            "STOKER_QUOTAS__DISK_GIB": "1",
            "STOKER_QUOTAS__CGROUP_PARENT": parent,
        }
    ).start()
    proc.cgroup_parent = parent  # type: ignore[attr-defined]
    try:
        yield proc
    finally:
        proc.cleanup()
        time.sleep(0.5)
        for controller in ("cpu", "cpuacct", "memory", "blkio"):
            base = CG / controller / parent
            if base.is_dir():
                for child in base.iterdir():
                    if child.is_dir():
                        with contextlib.suppress(OSError):
                            child.rmdir()
                with contextlib.suppress(OSError):
                    base.rmdir()


def enforced(api, name: str, limit: str) -> QuotaOut:
    """The quota view once ``limit`` is in effect (it is applied just after "running")."""
    return wait_for(lambda: (v := api.get_quota(name)).limits[limit].status == "enforced" and v, 10)


def check_bad_quotas(api, name: str) -> None:
    for body, status, words in (
        ({"cpu_percent": 0}, 422, "cpu_percent"),
        ({"cpu_percent": -50}, 422, "cpu_percent"),
        ({"memory_mib": 64}, 422, "below the guest's RAM of 128 MiB"),
        ({"disk_iops": -1}, 422, "disk_iops"),
        ({}, 422, "no limit given"),
        ({"network_mbps": 100}, 422, "network mode 'tap'"),
        ({"network_pps": 1000}, 422, "network mode 'tap'"),
    ):
        with pytest.raises(StokerError) as bad:
            api.request("PUT", f"/api/v1/vms/{name}/quota", json=body)
        assert bad.value.status == status, (body, bad.value.body)
        assert words in bad.value.detail, (body, bad.value.detail)
    with pytest.raises(StokerError) as missing:
        api.set_quota("no-such-vm", cpu_percent=50)
    assert missing.value.status == 404 and "no-such-vm" in missing.value.detail


def test_cpu_cap_memory_limit_live_change_violations_and_readoption(quota_agent, tmp_path):
    if detect() is not CgroupMode.V1 and not (CG / "cgroup.controllers").exists():
        pytest.skip("no usable cgroup hierarchy on this host")
    agent = quota_agent
    port = free_port()
    with agent.client() as api:
        # a drive larger than the default 1 GiB disk quota is refused at create
        big = agent.images / "big.img"
        with open(big, "wb") as f:
            f.truncate(2 * 1024**3)
        with pytest.raises(StokerError) as too_big:
            api.create_vm(guest_spec("too-big", None, drives=[{"path": str(big)}]))
        assert too_big.value.status == 422 and "1 GiB quota" in too_big.value.detail
        with pytest.raises(StokerError):
            api.get_vm("too-big")  # nothing half-made

        api.create_vm(guest_spec("burner", port))
        check_bad_quotas(api, "burner")
        saved = api.set_quota("burner", cpu_percent=50, memory_mib=128)
        assert saved.limits["cpu_percent"].status == "pending"

        vm = api.start_vm("burner", wait=True, timeout_s=90)
        assert vm.state == "running", vm
        pid, vm_id = vm.process.pid, vm.id
        view = enforced(api, "burner", "cpu_percent")
        assert view.limits["memory_mib"].status == "enforced", view
        limit = (128 + 160) * MiB
        assert view.limits["memory_mib"].vmm_limit_bytes == limit
        parent = agent.cgroup_parent
        if detect() is CgroupMode.V1:
            cpu_dir, mem_dir = CG / "cpu" / parent / vm_id, CG / "memory" / parent / vm_id
            assert (cpu_dir / "cpu.cfs_quota_us").read_text().strip() == "50000"
            assert (cpu_dir / "cpu.cfs_period_us").read_text().strip() == "100000"
            assert int((mem_dir / "memory.limit_in_bytes").read_text()) == limit
            assert str(pid) in (cpu_dir / "cgroup.procs").read_text().split()
            assert str(pid) in (mem_dir / "cgroup.procs").read_text().split()
        assert wait_for(lambda: http_get(f"http://127.0.0.1:{port}/health", 1.0), 30)

        if detect() is CgroupMode.V1:
            # other tests share these 2 cores: a high weight (not a cap) keeps their load from
            # hiding what the cap does; the cap still binds whatever the weight
            (CG / "cpu" / parent / "cpu.shares").write_text("50000")
            (cpu_dir / "cpu.shares").write_text("50000")
        get(f"http://127.0.0.1:{port}/cgi-bin/burn?seconds=120", 10)
        time.sleep(1)
        capped, _ = cpu_share(pid)
        api.remove_quota("burner")  # no defaults for CPU: the cap goes, live
        throttled_before = cpu_throttled(parent, vm_id)
        free, idle = cpu_share(pid)
        throttled_free = cpu_throttled(parent, vm_id) - throttled_before
        api.set_quota("burner", cpu_percent=25, memory_mib=128)
        recapped, _ = cpu_share(pid)
        print(
            f"VMM CPU: 50% cap {capped:.1%}, no cap {free:.1%} (host idle {idle:.1%}, "
            f"throttled periods {throttled_free}), 25% cap {recapped:.1%}"
        )
        assert capped <= 0.55, f"a 50% cap let the VMM use {capped:.1%} of a core"
        assert recapped <= 0.30, f"a 25% cap let the VMM use {recapped:.1%} of a core"
        assert throttled_free == 0, "the cgroup still throttled after the cap was removed"
        # > 90% of a core without a cap; on a host the other tests keep busy (no idle CPU
        # left) the loop can only get its share, which must still be far above the cap
        assert free > 0.90 or (idle < 0.05 and free > 1.4 * capped), (
            f"without a cap the busy guest used only {free:.1%} of a core "
            f"while the host was {idle:.1%} idle"
        )

        view = wait_for(lambda: (v := api.get_quota("burner")).violations.get("cpu") and v, 10)
        cpu = view.violations["cpu"]
        assert cpu.episodes >= 2 and cpu.total > 0, cpu
        assert view.usage["cpu_percent"] is not None
        assert view.usage["memory_bytes"] > 128 * MiB // 2
        found = events(agent, "quota.violation")
        assert any(e["kind"] == "cpu" and "25%" in e["message"] for e in found), found

        wide = {"COLUMNS": "200"}  # a wide "terminal", so table cells are not wrapped
        shown = CliRunner().invoke(
            cli_app, ["--socket", str(agent.socket), "quota", "get", "burner"], env=wide
        )
        assert shown.exit_code == 0, shown.output
        assert "25% (0.25 cores)" in shown.output and "enforced" in shown.output
        assert "cpu: " in shown.output  # violation count beside the limit
        listed = CliRunner().invoke(
            cli_app, ["--socket", str(agent.socket), "quota", "list"], env=wide
        )
        assert listed.exit_code == 0 and "burner" in listed.output
        refused = CliRunner().invoke(
            cli_app, ["--socket", str(agent.socket), "quota", "set", "burner", "--cpu", "0"]
        )
        assert refused.exit_code == 1 and "cpu_percent" in refused.output

        # restart: a new VMM, the quota applied again, and the guest runs under the limit
        vm = api.restart_vm("burner", graceful=False, wait=True, timeout_s=90)
        assert vm.state == "running" and vm.process.pid != pid
        pid = vm.process.pid
        assert wait_for(lambda: http_get(f"http://127.0.0.1:{port}/health", 1.0), 30)
        enforced(api, "burner", "cpu_percent")
        if detect() is CgroupMode.V1:
            assert str(pid) in (cpu_dir / "cgroup.procs").read_text().split()
            assert (cpu_dir / "cpu.cfs_quota_us").read_text().strip() == "25000"

    # re-adoption by a new agent process: the VMM is put back in its cgroup, limits re-applied
    agent.stop()
    again = AgentProcess(data_dir=agent.data_dir, env=agent.env).start()
    agent.proc = again.proc
    with again.client() as api:
        view = enforced(api, "burner", "cpu_percent")
        assert view.state == "running"
        assert view.effective == {"cpu_percent": 25, "memory_mib": 128, "disk_gib": 1}


def test_disk_throttle_visible_in_qemu_and_slows_direct_io(quota_agent, tmp_path):
    disk = quota_agent.images / "data.img"
    with open(disk, "wb") as f:
        f.truncate(64 * MiB)
    port = free_port()
    spec = guest_spec("disky", port, drives=[{"path": str(disk)}])
    spec["cmdline"] += " stoker.mkfs=1"
    with quota_agent.client() as api:
        start(api, spec)
        assert wait_for(lambda: http_get(f"http://127.0.0.1:{port}/health", 1.0), 30)
        view = api.get_quota("disky")
        assert view.usage["disk_bytes"] == 64 * MiB
        assert view.observed.drives[0].bytes_per_s == 0

        free_ms = int(get(f"http://127.0.0.1:{port}/cgi-bin/dd?mb=16"))
        limit = 2_000_000
        view = api.set_quota("disky", disk_bytes_per_s=limit, disk_iops=500)
        assert view.limits["disk_bytes_per_s"].status == "enforced", view
        observed = api.get_quota("disky").observed.drives
        assert observed == [
            DriveThrottleOut(device="vd0", bytes_per_s=limit, iops=500, group="stoker-vm")
        ]
        slow_ms = int(get(f"http://127.0.0.1:{port}/cgi-bin/dd?mb=16"))
        rate = 16 * MiB / (slow_ms / 1000)
        print(f"dd 16 MiB: {free_ms} ms free, {slow_ms} ms at {limit} B/s -> {rate:.0f} B/s")
        assert rate <= 1.5 * limit, f"guest wrote at {rate:.0f} B/s under a {limit} B/s limit"
        assert slow_ms > 3 * max(free_ms, 100)

        # the monitor sees the disk at its limit
        view = wait_for(lambda: (v := api.get_quota("disky")).violations and v, 10)
        assert "disk_bytes_per_s" in view.violations, view.violations

        # live removal: QEMU shows no throttle again
        api.remove_quota("disky")
        observed = api.get_quota("disky").observed.drives[0]
        assert (observed.bytes_per_s, observed.iops) == (0, 0)


def netns_agent(netns: str) -> AgentProcess:
    """The agent (and so its VMMs) inside a network namespace: TAPs and tc live there."""
    return AgentProcess(wrapper=["ip", "netns", "exec", netns])


def test_network_limit_on_tap_in_netns(guest):
    from pyroute2 import netns as pr_netns

    ns = "stoker-q-" + uuid.uuid4().hex[:8]
    pr_netns.create(ns)
    agent = netns_agent(ns)
    try:
        tap.create_tap("vmtap0", ns)
        agent.start()
        with agent.client() as api:
            start(api, guest_spec("tapped", None, network={"mode": "tap", "tap": "vmtap0"}))
            view = api.set_quota("tapped", network_mbps=10)
            assert view.limits["network_mbps"].status == "enforced", view
            q = netlimits.read_qdisc("vmtap0", ns)
            assert (q["kind"], q["rate"]) == ("tbf", 1_250_000), q
            assert q["ingress_redirect"] and q["ifb"]["rate"] == 1_250_000, q

            api.set_quota("tapped", network_mbps=40)  # live change
            q = netlimits.read_qdisc("vmtap0", ns)
            assert (q["rate"], q["ifb"]["rate"]) == (5_000_000, 5_000_000), q

            with pytest.raises(StokerError) as pps:
                api.set_quota("tapped", network_mbps=40, network_pps=10_000)
            assert pps.value.status == 422 and "firecracker" in pps.value.detail
            assert netlimits.read_qdisc("vmtap0", ns)["rate"] == 5_000_000  # unchanged

            api.remove_quota("tapped")
            q = netlimits.read_qdisc("vmtap0", ns)
            assert q["kind"] != "tbf" and not q["ingress_redirect"], q
    finally:
        agent.cleanup()
        pr_netns.remove(ns)
