"""Managed networks end to end: a real agent inside a network namespace made here, real
guests (QEMU, TCG) taking their addresses by DHCP from the agent's dnsmasq, NAT to a second
namespace standing in for "the outside", port forwards, isolation, quotas on the TAP, an
agent SIGKILLed and restarted, twenty guests at once, and refused input.

    A (the agent's namespace, entered with ``nsenter --net``): the agent, its QEMUs and
       dnsmasqs, bridges and nft tables,
       uplink0 203.0.113.1/24 ── veth ── O ("the outside"): 203.0.113.2/24, an HTTP server,
       and no route back to the guests' subnets, so only NAT'ed traffic gets answers.

No packet leaves the two namespaces; both (and every process inside) go at the end, with the
agent's dnsmasq state under /run and its cgroups. The guests of the module fixture boot once,
in parallel, and serve the scenarios in order; run with ``-s`` to see the measured figures.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from stoker.cli.main import app as cli_app
from stoker.client import Client, StokerError
from stoker.domain import ipam
from stoker.domain.units import mbps_to_bytes_per_s
from stoker.host import dnsmasq, firewall
from stoker.host.netlimits import read_qdisc
from stoker.services.networks.config import DEFAULT_SUBNET, RUN_DIR, default_state_dir
from tests import netns as tn
from tests.helpers import AgentProcess, guest_spec, short_tmpdir, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("qemu-system-x86_64", "nft", "dnsmasq", "ip")),
        reason="needs qemu-system-x86, nftables, dnsmasq-base and iproute2",
    ),
]

UPLINK_HOST, OUTSIDE, HTTP_PORT = "203.0.113.1", "203.0.113.2", 8000
GATEWAY = str(ipam.gateway(DEFAULT_SUBNET))
LAB_SUBNET, SCALE_SUBNET, TINY_SUBNET = "10.214.0.0/24", "10.215.0.0/24", "10.216.0.0/29"
FORWARD_PORT = 8090  # vm-a's forward on every address of A
# tbf counts frames: each 1448-byte TCP segment (timestamps on) is a 1514-byte frame
WIRE_PER_PAYLOAD = 1514 / 1448
CG = Path("/sys/fs/cgroup")
runner = CliRunner()


@dataclass
class World:
    host: tn.Netns
    outside: tn.Netns
    agent: AgentProcess
    work: Path
    cgroup_parent: str

    def api(self) -> Client:
        return self.agent.client()

    def stoker(self, *args: str) -> Any:
        return runner.invoke(cli_app, ["--socket", str(self.agent.socket), *args])

    def address(self, vm: str) -> str:
        with self.api() as api:
            spec = api.get_vm(vm).spec
            assert spec.network.name is not None
            net = api.get_network(spec.network.name)
            vm_id = api.get_vm(vm).id
        return next(lease.address for lease in net.leases if lease.vm_id == vm_id)

    def cgi(self, vm: str, path: str, timeout: float = 60) -> dict[str, str]:
        """A guest CGI's ``key value`` lines, asked from the agent's namespace."""
        url = f"http://{self.address(vm)}/cgi-bin/{path}"
        answer = self.host.http_get(url, timeout=timeout)
        assert answer is not None and answer[0] == 200, f"{path} on {vm}: {answer}"
        pairs = (line.partition(" ") for line in answer[1].splitlines() if line)
        return {key: value for key, _, value in pairs}

    def console(self, vm: str) -> str:
        with self.api() as api:
            vm_id = api.get_vm(vm).id
        path = self.agent.data_dir / "vms" / vm_id / "console.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def nft(self) -> str:
        return self.host.run("nft", "list", "ruleset")

    def links(self) -> list[str]:
        out = self.host.run("ip", "-o", "link", "show")
        return sorted(re.findall(r"^\d+: ([^:@]+)", out, re.M))


def _spec(name: str, network: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """The test guest; without ``network`` the request names none (the agent's default)."""
    spec = guest_spec(name, **{"boot_timeout_s": 150, **fields})
    spec.pop("network")
    if network is not None:
        spec["network"] = network
    return spec


def _start_all(api: Client, names: list[str], timeout: float = 180) -> float:
    """Start VMs at once; seconds until every one runs."""
    started = time.monotonic()
    for name in names:
        api.start_vm(name, wait=False)
    _wait_running(api, names, timeout)
    return time.monotonic() - started


def _wait_running(api: Client, names: list[str], timeout: float) -> None:
    def all_running() -> bool:
        states = {name: api.get_vm(name) for name in names}
        failed = [
            f"{n}: {v.state_reason}; console ends: {api.console(n, 400).text!r}"
            for n, v in states.items()
            if v.state == "error"
        ]
        assert not failed, failed
        return all(v.state == "running" for v in states.values())

    wait_for(all_running, timeout, 0.2)


def _remove_cgroups(parent: str) -> None:
    for controller in ("cpu", "cpuacct", "memory", "blkio", "unified", ""):
        base = CG / controller / parent if controller else CG / parent
        if base.is_dir():
            for child in base.iterdir():
                if child.is_dir():
                    with contextlib.suppress(OSError):
                        child.rmdir()
            with contextlib.suppress(OSError):
                base.rmdir()


def _remove_state(data_dir: Path) -> None:
    shutil.rmtree(default_state_dir(data_dir), ignore_errors=True)
    with contextlib.suppress(OSError):
        RUN_DIR.rmdir()  # only when no other agent's state is left in it


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with ExitStack() as cleanup:
        work = short_tmpdir("stknw-")
        cleanup.callback(shutil.rmtree, work, ignore_errors=True)
        (work / "www").mkdir()
        for name, size in (("f4m", 4_000_000), ("f8m", 8_000_000), ("f20m", 20_000_000)):
            (work / "www" / name).write_bytes(bytes(size))
        host, outside = cleanup.enter_context(tn.namespaces("a", "o"))
        tn.veth(host, "uplink0", f"{UPLINK_HOST}/24", outside, "eth0", f"{OUTSIDE}/24")
        server = outside.spawn(
            [sys.executable, "-m", "http.server", str(HTTP_PORT), "--bind", OUTSIDE,
             "--directory", str(work / "www")],
            work / "http.log",
        )  # fmt: skip
        cleanup.callback(server.wait)
        cleanup.callback(server.kill)
        parent = "stoker-ntest-" + uuid.uuid4().hex[:8]
        agent = AgentProcess(
            # only the network namespace: ``ip netns exec`` would also remount /sys, and the
            # cgroup mounts under it (CPU and memory quotas) with it
            wrapper=["nsenter", f"--net=/run/netns/{host.name}"],
            env={
                "STOKER_QUOTAS__CGROUP_PARENT": parent,
                "STOKER_RESOURCES__INTERVAL_S": "1",  # TAP counters sampled every second
                "STOKER_RESOURCES__CPU_OVERCOMMIT": "16",  # 24 one-vCPU guests on 2 cores
                "STOKER_HEALTH__STARTING_TIMEOUT_S": "600",  # and their boots take a while
            },
        )
        cleanup.callback(_remove_state, agent.data_dir)
        cleanup.callback(_remove_cgroups, parent)
        cleanup.callback(agent.cleanup)
        agent.start()
        world = World(host, outside, agent, work, parent)
        with world.api() as api:
            api.create_network("lab", LAB_SUBNET, isolation="open")
            forward = {"host_port": FORWARD_PORT, "guest_port": 80, "host_addr": "0.0.0.0"}
            api.create_vm(_spec("vm-a", {"mode": "managed", "port_forwards": [forward]}))
            api.create_vm(_spec("vm-b"))  # no network in the request: the default one
            for name in ("vm-c", "vm-d"):
                api.create_vm(_spec(name, {"mode": "managed", "name": "lab"}))
            took = _start_all(api, ["vm-a", "vm-b", "vm-c", "vm-d"])
        print(f"\nfour guests started at once, each with its address by DHCP: {took:.1f} s")
        yield world


# --- addresses and NAT -----------------------------------------------------------------------


def test_two_vms_on_the_default_network_get_distinct_addresses_by_dhcp(world: World) -> None:
    with world.api() as api:
        net = api.get_network("default")
        assert api.get_vm("vm-b").spec.network.mode == "managed"
    assert (net.subnet, net.gateway, net.managed_by) == (DEFAULT_SUBNET, GATEWAY, "config")
    leases = {lease.vm_name: lease for lease in net.leases}
    assert set(leases) == {"vm-a", "vm-b"}
    assert leases["vm-a"].address != leases["vm-b"].address
    for name, lease in leases.items():
        seen = world.cgi(name, "net")
        assert seen["mac"] == lease.mac and seen["addr4"] == f"{lease.address}/24"
        assert seen["gw4"] == GATEWAY
        assert f"stoker-dhcp: bound {lease.address}/24 via {GATEWAY}" in world.console(name)
    shown = world.stoker("vm", "show", "vm-b")
    assert shown.exit_code == 0 and f"address {leases['vm-b'].address}" in shown.output


def test_each_guest_reaches_the_gateway_and_the_outside_through_nat(world: World) -> None:
    assert "10.213." not in world.outside.run("ip", "route", "show")  # no way back but NAT
    for name in ("vm-a", "vm-b"):
        assert "reachable" in world.cgi(name, f"ping?host={GATEWAY}")
        got = world.cgi(name, f"fetch?url=http://{OUTSIDE}:{HTTP_PORT}/f4m")
        assert got["bytes"] == "4000000"
    log = (world.work / "http.log").read_text()
    clients = re.findall(r"^(\S+) - - .*GET /f4m", log, re.M)
    assert clients[-2:] == [UPLINK_HOST, UPLINK_HOST]  # the outside saw only the host


def test_isolated_guests_never_reach_each_other_open_ones_do(world: World) -> None:
    b = world.address("vm-b")
    assert world.cgi("vm-a", f"connect?host={b}&port=80&timeout=1").get("closed") is not None
    d = world.address("vm-d")
    assert "open" in wait_for(
        lambda: world.cgi("vm-c", f"connect?host={d}&port=80&timeout=1"), 10, 0.2
    )
    assert "reachable" in world.cgi("vm-d", f"ping?host={world.address('vm-c')}")


def test_a_port_forward_reaches_the_guest(world: World) -> None:
    ok = (200, "ok\n")
    assert world.outside.http_get(f"http://{UPLINK_HOST}:{FORWARD_PORT}/health") == ok
    assert world.host.http_get(f"http://127.0.0.1:{FORWARD_PORT}/health") == ok


# --- the README tour and the seed's quota line ------------------------------------------------


def test_tour_forward_and_seed_quota_line_then_gone_after_delete(world: World) -> None:
    made = world.stoker(
        "vm", "create", "web-server", "--guest", "--accel", "tcg", "--memory", "256",
        "--forward", "8080:80",
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    assert "managed 'default', address 10.213.0." in made.output
    started = world.stoker("vm", "start", "web-server", "--timeout", "150")
    assert started.exit_code == 0 and "running" in started.output, started.output
    url = "http://127.0.0.1:8080/health"
    assert wait_for(lambda: world.host.http_get(url, timeout=1), 10) == (200, "ok\n")
    seed = world.stoker(
        "quota", "set", "web-server", "--cpu", "200", "--memory", "4096", "--disk", "100",
        "--network", "100",
    )  # fmt: skip
    assert seed.exit_code == 0, seed.output
    limits = ("cpu_percent", "memory_mib", "disk_gib", "network_mbps")
    with world.api() as api:
        vm_id = api.get_vm("web-server").id
        wait_for(  # applied just after "running"
            lambda: {api.get_quota("web-server").limits[n].status for n in limits} == {"enforced"},
            10,
        )
    tap = ipam.tap_name(vm_id)
    assert read_qdisc(tap, world.host.name)["rate"] == mbps_to_bytes_per_s(100)
    listed = world.stoker("network", "list")
    assert listed.exit_code == 0 and "default" in listed.output and "lab" in listed.output
    assert "new VMs join the managed network 'default'" in listed.output

    gone = world.stoker("vm", "delete", "web-server", "--force")
    assert gone.exit_code == 0, gone.output
    wait_for(lambda: tap not in world.links(), 5)
    assert f"vm={vm_id}" not in world.nft()
    assert world.host.http_get(url, timeout=1) is None
    with world.api() as api:
        assert vm_id not in {lease.vm_id for lease in api.get_network("default").leases}


# --- quotas on the TAP -------------------------------------------------------------------------


def _download(world: World, vm: str, name: str) -> float:
    """Mbit/s of TCP payload for the guest fetching ``name`` from the outside."""
    got = world.cgi(vm, f"fetch?url=http://{OUTSIDE}:{HTTP_PORT}/{name}")
    return int(got["bytes"]) * 8 / (int(got["ms"]) / 1000) / 1e6


def test_network_quota_binds_on_the_tap_and_changes_live(world: World) -> None:
    with world.api() as api:
        vm_id = api.get_vm("vm-a").id
        unlimited = _download(world, "vm-a", "f20m")
        api.set_quota("vm-a", network_mbps=10)
        ten = _download(world, "vm-a", "f4m") * WIRE_PER_PAYLOAD
        api.set_quota("vm-a", network_mbps=20)  # live change
        twenty = _download(world, "vm-a", "f8m") * WIRE_PER_PAYLOAD
        api.set_quota("vm-a", network_pps=500)  # bandwidth back to unlimited
        view = api.get_quota("vm-a")
        limits = firewall.Firewall(netns=world.host.name).state().limits_of(vm_id)
        api.remove_quota("vm-a")
        after = firewall.Firewall(netns=world.host.name).state().limits_of(vm_id)
        metrics = wait_for(
            lambda: (m := api.vm_metrics("vm-a")).latest and m.latest.net_rx_bytes and m, 10
        )
    print(
        f"\nguest download: unlimited {unlimited:.1f} Mbit/s, quota 10 -> {ten:.2f}, "
        f"changed live to 20 -> {twenty:.2f} Mbit/s on the wire"
    )
    assert 9.0 <= ten <= 11.0
    assert 18.0 <= twenty <= 22.0
    assert unlimited >= 5 * ten
    assert view.limits["network_pps"].status == "enforced", view.limits["network_pps"]
    tap = ipam.tap_name(vm_id)
    assert limits == [firewall.TapLimits(vm_id, tap, guest_rx_pps=500, guest_tx_pps=500)]
    assert after == []
    assert metrics.latest.net_rx_bytes >= 20_000_000  # counted on the TAP


# --- supervision and an agent restart ----------------------------------------------------------


def _dnsmasq_pids(world: World) -> dict[str, int]:
    with world.api() as api:
        return {net.name: net.dnsmasq_pid for net in api.list_networks() if net.dnsmasq_pid}


def test_a_dnsmasq_that_dies_is_started_again(world: World) -> None:
    before = _dnsmasq_pids(world)
    os.kill(before["lab"], signal.SIGKILL)
    after = wait_for(
        lambda: (p := _dnsmasq_pids(world)).get("lab") not in (None, before["lab"]) and p, 10
    )
    assert after["default"] == before["default"]
    serving = dnsmasq.list_running(world.host.name)
    assert sorted(p.pid for p in serving) == sorted(after.values())
    with world.api() as api:
        said = [e.message for e in api.events(type="network.dnsmasq_restarted", limit=10)]
    assert f"network lab: its dnsmasq died and was started again (pid {after['lab']})" in said


def _stoker_rules(world: World) -> list[str]:
    return sorted(re.findall(r'comment "(stoker [^"]+)"', world.nft()))


def test_agent_sigkilled_and_restarted_keeps_addresses_and_connectivity(world: World) -> None:
    names = ["vm-a", "vm-b", "vm-c", "vm-d"]
    addresses = {name: world.address(name) for name in names}
    rules, links, pids = _stoker_rules(world), world.links(), _dnsmasq_pids(world)
    assert world.agent.proc is not None
    world.agent.proc.kill()
    world.agent.proc.wait()
    started = time.monotonic()
    world.agent.start()
    with world.api() as api:
        wait_for(lambda: all(api.get_vm(n).state == "running" for n in names), 30)
        wait_for(lambda: all(net.dnsmasq_pid for net in api.list_networks()), 10)
    print(f"\nagent restarted and reconciled in {time.monotonic() - started:.2f} s")
    assert {name: world.address(name) for name in names} == addresses
    assert _stoker_rules(world) == rules  # nothing doubled, nothing lost
    assert world.links() == links
    assert _dnsmasq_pids(world) == pids  # re-adopted, not started twice
    assert len(dnsmasq.list_running(world.host.name)) == len(pids)
    for name in names:
        assert world.cgi(name, "net")["addr4"] == f"{addresses[name]}/24"
    got = world.cgi("vm-b", f"fetch?url=http://{OUTSIDE}:{HTTP_PORT}/f4m")
    assert got["bytes"] == "4000000"
    ok = (200, "ok\n")
    assert world.outside.http_get(f"http://{UPLINK_HOST}:{FORWARD_PORT}/health") == ok


# --- twenty at once ---------------------------------------------------------------------------


def test_twenty_vms_started_at_once_get_twenty_addresses_never_reused(world: World) -> None:
    names = [f"s{i:02d}" for i in range(20)]
    scale = {"mode": "managed", "name": "scale"}
    with world.api() as api:
        api.create_network("scale", SCALE_SUBNET)

    def create_and_start(name: str) -> None:
        with world.api() as api:
            # 20 TCG guests share 2 cores (and whatever else runs): a generous boot budget
            api.create_vm(_spec(name, scale, memory_mib=96, boot_timeout_s=540))
            api.start_vm(name, wait=False)

    try:
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            list(pool.map(create_and_start, names))
        with world.api() as api:
            _wait_running(api, names, timeout=570)
            handed_out = {lease.vm_name: lease.address for lease in api.get_network("scale").leases}
        took = time.monotonic() - started
        print(f"\n20 guests (96 MiB, TCG) created and started at once: all running in {took:.1f} s")
        assert len(set(handed_out.values())) == 20 and set(handed_out) == set(names)
        for name in names:
            assert f"stoker-dhcp: bound {handed_out[name]}/24" in world.console(name)
        with world.api() as api:
            for name in names[:10]:
                api.delete_vm(name, force=True)
            for i in range(10):
                api.create_vm(_spec(f"r{i:02d}", scale, memory_mib=96))
            again = {lease.vm_name: lease.address for lease in api.get_network("scale").leases}
        fresh = {again[f"r{i:02d}"] for i in range(10)}
        assert not fresh & set(handed_out.values()) and len(fresh) == 10
    finally:
        with world.api() as api:
            for vm in api.list_vms():
                if vm.spec.network.name == "scale":
                    api.delete_vm(vm.name, force=True)
            assert api.get_network("scale").leases == []
            api.delete_network("scale")
    _only_fixture_taps(world)


# --- refused input --------------------------------------------------------------------------


def _refused(api: Client, method: str, path: str, **kwargs: Any) -> StokerError:
    with pytest.raises(StokerError) as refused:
        api.request(method, path, **kwargs)
    return refused.value


def _only_fixture_taps(world: World) -> None:
    """Wait until the TAPs are those of the fixture's four VMs (deleted VMs' TAPs go just
    after the delete answers)."""
    with world.api() as api:
        kept = {ipam.tap_name(api.get_vm(n).id) for n in ("vm-a", "vm-b", "vm-c", "vm-d")}

    def taps() -> set[str]:
        return {n for n in world.links() if n.startswith(ipam.TAP_PREFIX)}

    try:
        wait_for(lambda: taps() == kept, 60, 0.2)
    except TimeoutError:
        log = world.agent.logs()[-4000:]
        raise AssertionError(
            f"TAPs left {taps() - kept}, missing {kept - taps()}:\n{log}"
        ) from None


def test_bad_input_is_a_4xx_that_names_what_to_fix_and_leaves_nothing(world: World) -> None:
    _only_fixture_taps(world)
    links, rules = world.links(), _stoker_rules(world)
    with world.api() as api:
        names = [net.name for net in api.list_networks()]
        cases = [
            ({"name": "x", "subnet": "10.213.0.0/16"}, 409, "overlaps network 'default'"),
            ({"name": "x", "subnet": "8.8.8.0/24"}, 422, "not private"),
            ({"name": "x", "subnet": f"{UPLINK_HOST}/24"}, 422, "has host bits set"),
            ({"name": "x", "subnet": "10.220.0.0/24", "bridge": "a-very-long-bridge"}, 422,
             "Linux interface names are at most 15"),
            ({"name": "x", "subnet": "10.220.0.0/24", "bridge": "uplink0"}, 409,
             "interface uplink0 exists already"),
            ({"name": "lab", "subnet": "10.220.0.0/24"}, 409, "exists already"),
        ]  # fmt: skip
        for body, status, words in cases:
            bad = _refused(api, "POST", "/api/v1/networks", json=body)
            assert (bad.status, words in bad.detail) == (status, True), (body, bad.detail)
        assert [net.name for net in api.list_networks()] == names
        assert world.links() == links and _stoker_rules(world) == rules

        api.create_network("tiny", TINY_SUBNET)
        for i in range(5):  # a /29 holds five
            api.create_vm(_spec(f"t{i}", {"mode": "managed", "name": "tiny"}))
        full = _refused(
            api, "POST", "/api/v1/vms", json=_spec("t5", {"mode": "managed", "name": "tiny"})
        )
        assert full.status == 409 and "'tiny' has no free address" in full.detail
        assert "t5" not in {vm.name for vm in api.list_vms()}
        in_use = _refused(api, "DELETE", "/api/v1/networks/tiny")
        assert in_use.status == 409 and "in use by 5 VM(s): t0, t1, t2, t3, t4" in in_use.detail
        unknown = _refused(
            api, "POST", "/api/v1/vms", json=_spec("t6", {"mode": "managed", "name": "nope"})
        )
        assert unknown.status == 422 and "no network named 'nope'" in unknown.detail
        for i in range(5):
            api.delete_vm(f"t{i}")
        api.delete_network("tiny")
        assert [net.name for net in api.list_networks()] == names
    assert world.links() == links and _stoker_rules(world) == rules
