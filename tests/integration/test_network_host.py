"""The building blocks of managed VM networking on real bridges, TAPs, nftables, dnsmasq and
QEMU guests (TCG), all inside network namespaces made here; no packet leaves them.

    guest A: QEMU under ``ip netns exec H``, ``-netdev tap,ifname=TAP``   ┐
    guest B: QEMU in the test's own namespace, ``-netdev tap,fd=N`` from   ├ bridge 10.88.0.1/24
             ``open_tap_fd`` (the VMM need not be in the namespace)       ┘ (in H)
    H: dnsmasq on the bridge, stoker's nft tables, ``uplink0`` 203.0.113.1/24
      ── veth ── O ("the outside"): 203.0.113.2/24, an HTTP server and a TCP sink,
                 and no route back to 10.88.0.0/24, so only NAT'ed traffic gets answers.

The guests boot once for the module (in parallel) and serve every scenario; each test puts
back what it changes. Transfers are sized to take about three seconds where a rate is
measured. Run with ``-s`` to see the measured figures.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from ipaddress import IPv6Network
from pathlib import Path

import pytest

from stoker.domain import ipam
from stoker.domain.units import tbf_burst_bytes
from stoker.host import bridge, dnsmasq, firewall, netlimits
from stoker.host.tsc import host_tsc_khz
from tests import netns as tn
from tests.helpers import guest_image, short_tmpdir, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("qemu-system-x86_64", "nft", "dnsmasq", "ip")),
        reason="needs qemu-system-x86, nftables, dnsmasq-base and iproute2",
    ),
]

SUBNET = "10.88.0.0/24"
UPLINK_HOST, OUTSIDE = "203.0.113.1", "203.0.113.2"
HTTP_PORT, SINK_PORT = 8000, 9000
TEN_MBIT = 1_250_000  # bytes/s
SINK = r"""
import socket, sys, threading, time
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
def take(conn):
    n, t0 = 0, None
    while data := conn.recv(1 << 20):
        t0 = t0 or time.monotonic()
        n += len(data)
    print(f"bytes={n} seconds={time.monotonic() - (t0 or time.monotonic()):.3f}", flush=True)
    conn.close()
while True:
    threading.Thread(target=take, args=(server.accept()[0],), daemon=True).start()
"""


@dataclass
class Guest:
    name: str
    tap: str
    mac: str
    address: str
    console: Path
    proc: subprocess.Popen[bytes]
    ready_s: float = 0.0


@dataclass
class Env:
    host: tn.Netns
    outside: tn.Netns
    work: Path
    bridge: str
    plan: ipam.AddressPlan
    subnet6: IPv6Network
    fw: firewall.Firewall
    dns: dnsmasq.DnsmasqProcess
    guests: dict[str, Guest] = field(default_factory=dict)

    @property
    def a(self) -> Guest:
        return self.guests["vm-a"]

    @property
    def b(self) -> Guest:
        return self.guests["vm-b"]

    def cgi(self, guest: Guest, path: str, timeout: float = 60) -> dict[str, str]:
        """A guest CGI's ``key value`` lines (first word of each line, rest of the line)."""
        answer = self.host.http_get(f"http://{guest.address}/cgi-bin/{path}", timeout=timeout)
        assert answer is not None and answer[0] == 200, f"{path} on {guest.name}: {answer}"
        pairs = (line.partition(" ") for line in answer[1].splitlines() if line)
        return {key: value for key, _, value in pairs}

    def network_rules(self, isolated: bool) -> firewall.NetworkRules:
        return _network_rules(self.bridge, self.plan, self.subnet6, isolated)

    def set_isolated(self, isolated: bool) -> None:
        for guest in self.guests.values():
            bridge.set_isolated(guest.tap, isolated, self.host.name)
        self.fw.set_network(self.network_rules(isolated))


def _network_rules(
    br: str, plan: ipam.AddressPlan, subnet6: IPv6Network, isolated: bool
) -> firewall.NetworkRules:
    return firewall.NetworkRules("default", br, plan.subnet, isolated=isolated, ipv6_subnet=subnet6)


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _qemu_argv(netdev: str, mac: str, console: Path) -> list[str]:
    image = guest_image()
    tsc = host_tsc_khz()
    cmdline = image.cmdline + (f" tsc_early_khz={tsc}" if tsc else "")
    return [
        "qemu-system-x86_64", "-M", "microvm", "-nodefaults", "-no-user-config", "-no-reboot",
        "-display", "none", "-accel", "tcg", "-cpu", "qemu64", "-m", "128", "-smp", "1",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", cmdline,
        "-chardev", f"file,id=con0,path={console}", "-serial", "chardev:con0",
        "-netdev", netdev, "-device", f"virtio-net-device,netdev=n0,mac={mac}",
    ]  # fmt: skip


def _kill(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()


def _boot(
    name: str, address: str, host: tn.Netns, br: str, work: Path, cleanup: ExitStack, *, fd: bool
) -> Guest:
    """One guest on the bridge: by TAP name with QEMU inside the namespace, or (``fd``) with
    a descriptor from :func:`bridge.open_tap_fd` and QEMU left in the test's namespace."""
    tap, mac, console = ipam.tap_name(name), ipam.mac_for_vm(name), work / f"{name}.console"
    bridge.ensure_tap(tap, uid=0, gid=0, bridge=br, isolated=True, alias=name, netns=host.name)
    if not fd:
        netdev = f"tap,id=n0,ifname={tap},script=no,downscript=no"
        proc = host.spawn(_qemu_argv(netdev, mac, console), work / f"{name}.log")
    else:
        tap_fd = bridge.open_tap_fd(tap, host.name)
        try:
            with open(work / f"{name}.log", "ab") as log:
                proc = subprocess.Popen(
                    _qemu_argv(f"tap,id=n0,fd={tap_fd}", mac, console),
                    pass_fds=[tap_fd],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
        finally:
            os.close(tap_fd)  # QEMU holds its own copy
    cleanup.callback(_kill, proc)
    return Guest(name, tap, mac, address, console, proc)


def _wait_ready(guest: Guest, started: float) -> None:
    marker = guest_image().ready_marker

    def ready() -> bool:
        log = guest.console.with_suffix(".log")
        assert guest.proc.poll() is None, f"{guest.name} exited: {_text(log)}{_text(guest.console)}"
        return marker in _text(guest.console)

    wait_for(ready, 60, 0.01)
    guest.ready_s = time.monotonic() - started


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with ExitStack() as cleanup:
        work = short_tmpdir("stknet-")
        cleanup.callback(shutil.rmtree, work, ignore_errors=True)
        work.chmod(0o755)  # dnsmasq re-reads its hosts file as nobody
        (work / "www").mkdir()
        (work / "www" / "f20m").write_bytes(bytes(20_000_000))
        (work / "www" / "f4m").write_bytes(bytes(4_000_000))
        (work / "sink.py").write_text(SINK)
        host, outside = cleanup.enter_context(tn.namespaces("h", "o"))
        tn.veth(host, "uplink0", f"{UPLINK_HOST}/24", outside, "eth0", f"{OUTSIDE}/24")
        for argv, log in (
            (
                [sys.executable, "-m", "http.server", str(HTTP_PORT), "--bind", OUTSIDE,
                 "--directory", str(work / "www")],
                work / "http.log",
            ),
            ([sys.executable, str(work / "sink.py"), OUTSIDE, str(SINK_PORT)], work / "sink.log"),
        ):  # fmt: skip
            cleanup.callback(_kill, outside.spawn(argv, log))

        # the network, as the network service will set it up
        firewall.enable_forwarding(host.name, ipv6=True)
        plan = ipam.plan(ipam.validate_subnet(SUBNET))
        subnet6 = ipam.ula_subnet("default")
        br = ipam.bridge_name("default")
        bridge.ensure_bridge(
            br,
            plan.gateway_cidr,
            ipv6_cidr=f"{ipam.ula_gateway(subnet6)}/64",
            mac=ipam.bridge_mac("default"),
            alias="stoker network default",
            netns=host.name,
        )
        firewall.enable_localhost_forwards(br, host.name)
        fw = firewall.Firewall(host.name)
        fw.set_network(_network_rules(br, plan, subnet6, isolated=True))
        taken: set[str] = set()
        cursor = None
        leases = []
        for name in ("vm-a", "vm-b"):
            address, cursor = ipam.allocate(plan.subnet, taken, cursor)
            taken.add(address)
            leases.append(dnsmasq.DhcpHost(ipam.mac_for_vm(name), address, name))
        dns_config = dnsmasq.DnsmasqConfig(
            br, plan.subnet, plan.gateway, work / "dnsmasq", ipv6_subnet=subnet6
        )
        dns = dnsmasq.start(dns_config, leases, netns=host.name)
        cleanup.callback(dnsmasq.stop, dns)

        started = time.monotonic()
        guests = [
            _boot(lease.hostname or "", lease.address, host, br, work, cleanup, fd=i == 1)
            for i, lease in enumerate(leases)
        ]
        for guest in guests:
            _wait_ready(guest, started)
        print(
            "\nboot to ready, two guests at once, address by DHCP: "
            + ", ".join(f"{g.name} {g.ready_s:.2f} s" for g in guests)
        )
        yield Env(host, outside, work, br, plan, subnet6, fw, dns, {g.name: g for g in guests})


# --- addresses -------------------------------------------------------------------------------


def test_dhcp_gives_each_guest_its_static_lease(env: Env) -> None:
    for guest in (env.a, env.b):
        net = env.cgi(guest, "net")
        assert net["mac"] == guest.mac
        assert net["addr4"] == f"{guest.address}/24"
        assert net["gw4"] == str(env.plan.gateway)
        assert f"stoker-dhcp: bound {guest.address}/24" in _text(guest.console)
    assert env.a.address != env.b.address
    leases = _text(env.work / "dnsmasq" / "dnsmasq.leases")
    assert f"{env.a.mac} {env.a.address}" in leases and f"{env.b.mac} {env.b.address}" in leases
    assert dnsmasq.is_running(env.dns)
    assert dnsmasq.find_running(env.work / "dnsmasq") == env.dns


# --- NAT and isolation -----------------------------------------------------------------------


def test_guests_reach_gateway_and_outside_only_through_nat(env: Env) -> None:
    assert "10.88." not in env.outside.run("ip", "route", "show")  # no way back but NAT
    for guest in (env.a, env.b):
        assert "reachable" in env.cgi(guest, f"ping?host={env.plan.gateway}")
        got = env.cgi(guest, f"fetch?url=http://{OUTSIDE}:{HTTP_PORT}/f4m")
        assert got["bytes"] == "4000000"
    clients = re.findall(r"^(\S+) - - .*GET /f4m", _text(env.work / "http.log"), re.M)
    assert clients[-2:] == [UPLINK_HOST, UPLINK_HOST]  # the outside saw only the host


def test_isolation_on_and_off(env: Env) -> None:
    a_to_b = f"connect?host={env.b.address}&port=80&timeout=1"
    assert env.cgi(env.a, a_to_b).get("closed") is not None
    try:
        env.set_isolated(False)
        # A's ARP request for B from the probes above may still be failing: allow it to settle
        wait_for(lambda: "open" in env.cgi(env.a, a_to_b), 8, 0.2)
        assert "reachable" in env.cgi(env.b, f"ping?host={env.a.address}")
    finally:
        env.set_isolated(True)
    assert env.cgi(env.a, a_to_b).get("closed") is not None
    # the bridge's port isolation alone blocks it too (and so does the firewall alone)
    env.fw.set_network(env.network_rules(isolated=False))
    try:
        assert env.cgi(env.a, a_to_b).get("closed") is not None
    finally:
        env.fw.set_network(env.network_rules(isolated=True))


# --- port forwards ---------------------------------------------------------------------------


def test_port_forward_reaches_guest_and_is_gone_after_removal(env: Env) -> None:
    fwd = firewall.PortForward
    forwards = [
        fwd("vm-a", "tcp", "0.0.0.0", 8080, env.a.address, 80),
        fwd("vm-a", "tcp", "127.0.0.1", 8081, env.a.address, 80),
    ]
    env.fw.set_forwards("vm-a", forwards)
    try:
        assert env.fw.state().forwards_of("vm-a") == sorted(forwards)
        with pytest.raises(firewall.ForwardConflict, match="taken by VM vm-a"):
            env.fw.set_forwards("vm-b", [fwd("vm-b", "tcp", "127.0.0.1", 8080, env.b.address, 80)])
        ok = (200, "ok\n")
        assert env.outside.http_get(f"http://{UPLINK_HOST}:8080/health") == ok  # another host
        assert env.host.http_get("http://127.0.0.1:8080/health") == ok  # the host itself
        assert env.host.http_get("http://127.0.0.1:8081/health") == ok
        assert env.host.http_get(f"http://{UPLINK_HOST}:8080/health") == ok
        assert env.outside.http_get(f"http://{UPLINK_HOST}:8081/health", timeout=1) is None
    finally:
        env.fw.set_forwards("vm-a", [])
    assert env.fw.state().forwards == ()
    assert "8080" not in env.host.run("nft", "list", "table", "inet", "stoker")
    assert env.outside.http_get(f"http://{UPLINK_HOST}:8080/health", timeout=1) is None
    assert env.host.http_get("http://127.0.0.1:8081/health", timeout=1) is None


def test_hairpin_forward_without_br_netfilter(env: Env) -> None:
    """A guest using a forward to another guest of its isolated network works where
    br_netfilter is off; with it on, the kernel bridges the DNATed frame to the isolated
    port, which drops it (documented in nft_rules)."""
    fwd = firewall.PortForward("vm-a", "tcp", "0.0.0.0", 8082, env.a.address, 80)
    env.fw.set_forwards("vm-a", [fwd])
    sysctl = "net.bridge.bridge-nf-call-iptables"
    before = env.host.run("sysctl", "-n", sysctl).strip()
    try:
        env.host.run("sysctl", "-w", f"{sysctl}=0")
        got = env.cgi(env.b, f"fetch?url=http://{UPLINK_HOST}:8082/health&timeout=5")
        assert got["bytes"] == "3"
    finally:
        env.host.run("sysctl", "-w", f"{sysctl}={before}")
        env.fw.set_forwards("vm-a", [])


# --- IPv6 (SLAAC has finished by now) ---------------------------------------------------------


def test_ipv6_slaac_address_and_gateway(env: Env) -> None:
    want = f"{ipam.slaac_address(env.subnet6, env.a.mac)}/64"
    net = wait_for(lambda: (n := env.cgi(env.a, "net")).get("addr6") == want and n, 10, 0.2)
    assert net["gw6"].startswith("fe80::")
    ping = env.cgi(env.a, f"ping?host={ipam.ula_gateway(env.subnet6)}")
    assert "reachable" in ping, ping


# --- rates -----------------------------------------------------------------------------------


def _download(env: Env, name: str) -> tuple[int, float, bridge.TapCounters]:
    """Guest A fetches ``name`` from the outside: (bytes, seconds, TAP counter deltas)."""
    before = bridge.read_counters(env.a.tap, env.host.name)
    got = env.cgi(env.a, f"fetch?url=http://{OUTSIDE}:{HTTP_PORT}/{name}")
    after = bridge.read_counters(env.a.tap, env.host.name)
    delta = bridge.TapCounters(
        *(getattr(after, f) - getattr(before, f) for f in before.__dataclass_fields__)
    )
    return int(got["bytes"]), int(got["ms"]) / 1000, delta


def _mbit(nbytes: int, seconds: float) -> float:
    return nbytes * 8 / seconds / 1e6


# tbf counts frames: each 1448-byte TCP segment (timestamps on) is a 1514-byte frame
WIRE_PER_PAYLOAD = 1514 / 1448


def test_bandwidth_limit_tbf_is_accurate_nft_bytes_is_not(env: Env) -> None:
    size, seconds, counted = _download(env, "f20m")
    unlimited = _mbit(size, seconds)
    assert counted.tx_bytes >= size  # the TAP's counters see the guest's download
    try:
        burst = tbf_burst_bytes(TEN_MBIT)  # what the quota service asks for
        netlimits.apply_egress_limit(env.a.tap, TEN_MBIT, burst, netns=env.host.name)
        size, seconds, _ = _download(env, "f4m")
        shaped = _mbit(size, seconds)
    finally:
        netlimits.clear_limits(env.a.tap, env.host.name)
    try:
        env.fw.set_limits(firewall.TapLimits("vm-a", env.a.tap, guest_rx_bytes_per_s=TEN_MBIT))
        size, policed_s, _ = _download(env, "f4m")
        policed = _mbit(size, policed_s)
    finally:
        env.fw.clear_limits(env.a.tap)
    print(
        f"\nguest download (TCP payload): unlimited {unlimited:.1f} Mbit/s; 10 Mbit/s by tbf "
        f"{shaped:.2f} ({shaped * WIRE_PER_PAYLOAD:.2f} on the wire); by nft byte limit "
        f"{policed:.2f} ({policed_s:.2f} s for 4 MB)"
    )
    assert 9.0 <= shaped * WIRE_PER_PAYLOAD <= 11.0  # tbf: 10 Mbit/s +- 10 %
    assert unlimited >= 5 * shaped
    # nft's bucket holds one second of rate plus the 128 KiB burst, then it polices
    bucket = TEN_MBIT + 128 * 1024
    expected_s = (4_000_000 - bucket) / TEN_MBIT
    assert 0.9 * expected_s <= policed_s <= 1.5 * expected_s, policed_s


def test_packet_rate_limit_in_the_taps_hooks(env: Env) -> None:
    """The guest sends 1 MiB to the outside under a 500 packets/s limit; the TAP's counters
    show the packet rate it got through, the rule's counter what it dropped."""
    pps = 500
    env.fw.set_limits(firewall.TapLimits("vm-a", env.a.tap, guest_tx_pps=pps))
    try:
        state = env.fw.state()
        assert state.limits_of("vm-a") == [firewall.TapLimits("vm-a", env.a.tap, guest_tx_pps=pps)]
        before = bridge.read_counters(env.a.tap, env.host.name)
        started = time.monotonic()
        got = env.cgi(env.a, f"send?host={OUTSIDE}&port={SINK_PORT}&kb=1024")
        elapsed = time.monotonic() - started
        after = bridge.read_counters(env.a.tap, env.host.name)
        dropped = env.fw.state().dropped[(env.a.tap, "guest_tx")]
    finally:
        env.fw.clear_limits(env.a.tap)
    assert env.fw.state().limits == ()
    rate = (after.rx_packets - before.rx_packets) / elapsed
    print(
        f"\nguest send under {pps} packets/s: {rate:.0f} packets/s passed, {dropped} dropped, "
        f"{_mbit(int(got['bytes']), elapsed):.2f} Mbit/s"
    )
    assert dropped > 0
    assert 0.3 * pps <= rate <= 1.1 * pps + 50 / elapsed  # a burst of 50 passes at once


# --- the host's own rules and reconciliation -------------------------------------------------


def test_foreign_forward_drop_wins_and_is_reported(env: Env) -> None:
    assert env.fw.forward_blockers() == []
    foreign = (
        "table ip filter { chain FORWARD { type filter hook forward priority 0; policy drop; }; }"
    )
    subprocess.run(env.host.argv("nft", "-f", "-"), input=foreign.encode(), check=True)
    try:
        assert env.fw.forward_blockers() == ["table ip filter chain FORWARD"]
        url = urllib.parse.quote(f"http://{OUTSIDE}:{HTTP_PORT}/f4m", safe="")
        answer = env.host.http_get(
            f"http://{env.a.address}/cgi-bin/fetch?url={url}&timeout=2", timeout=10
        )
        assert answer is None  # our accept does not override another table's drop
    finally:
        env.host.run("nft", "delete", "table", "ip", "filter")
    assert env.cgi(env.a, f"fetch?url=http://{OUTSIDE}:{HTTP_PORT}/f4m")["bytes"] == "4000000"


def test_reconcile_removes_what_belongs_to_no_vm_or_network(env: Env) -> None:
    ghost_tap = ipam.tap_name("ghost")
    bridge.ensure_tap(ghost_tap, netns=env.host.name)
    try:
        env.fw.set_network(
            firewall.NetworkRules("old", ipam.bridge_name("old"), ipam.plan("10.99.0.0/24").subnet)
        )
        env.fw.set_forwards(
            "ghost", [firewall.PortForward("ghost", "udp", "0.0.0.0", 5353, "10.88.0.200", 53)]
        )
        env.fw.set_limits(firewall.TapLimits("ghost", ghost_tap, guest_rx_pps=10))
        env.fw.set_limits(firewall.TapLimits("vm-b", env.b.tap, guest_rx_pps=100_000))
        state = env.fw.state()
        assert state.networks == {"default", "old"} and state.vms == {"ghost", "vm-b"}
        left = env.fw.reconcile(networks={"default"}, vms={"vm-a", "vm-b"})
        assert left.networks == {"default"}
        assert left.forwards == ()
        assert [lim.vm for lim in left.limits] == ["vm-b"]
        assert "ghost" not in env.host.run("nft", "list", "ruleset")
        env.fw.remove_vm("vm-b")
        assert env.fw.state().limits == ()
    finally:
        bridge.delete_link(ghost_tap, env.host.name)
        env.fw.remove_network("old")
        env.fw.clear_limits(env.b.tap)
    assert "reachable" in env.cgi(env.b, f"ping?host={env.plan.gateway}")


# --- host pieces without guests --------------------------------------------------------------


@pytest.fixture
def bare_ns() -> Iterator[tn.Netns]:
    with tn.namespaces("bare") as (ns,):
        yield ns


def test_bridge_and_tap_are_idempotent_and_owned(bare_ns: tn.Netns) -> None:
    ns = bare_ns.name
    br, tap, other = ipam.bridge_name("n1"), ipam.tap_name("v1"), ipam.tap_name("v2")
    index = bridge.ensure_bridge(br, "10.77.0.1/24", mac="02:00:00:00:00:01", netns=ns)
    assert bridge.ensure_bridge(br, "10.77.0.1/24", mac="02:00:00:00:00:01", netns=ns) == index
    assert bridge.ensure_tap(tap, uid=65534, gid=65534, bridge=br, netns=ns) == bridge.ensure_tap(
        tap, uid=65534, gid=65534, bridge=br, netns=ns
    )
    bridge.ensure_tap(other, uid=0, gid=0, netns=ns)
    info = bridge.link_info(tap, ns)
    assert info is not None
    assert (info.kind, info.master, info.owner_uid, info.isolated) == ("tap", br, 65534, True)
    assert [link.name for link in bridge.list_links(netns=ns)] == sorted([br, tap, other])
    assert "10.77.0.1/24" in bare_ns.run("ip", "-4", "addr", "show", "dev", br)
    with pytest.raises(bridge.NetDeviceError, match="not a TAP"):
        bridge.ensure_tap(br, netns=ns)
    with pytest.raises(bridge.NetDeviceError, match="belongs to uid 65534"):
        bridge.ensure_tap(tap, uid=1000, netns=ns)
    with pytest.raises(bridge.NetDeviceError, match="not a bridge"):
        bridge.ensure_bridge(tap, "10.77.0.1/24", netns=ns)
    # a VMM running as the TAP's owner may attach to it, and to no other one. /dev/net/tun is
    # root-only (0600) on these hosts, so the probe opens it as root, then drops to nobody
    # before TUNSETIFF (where the kernel checks the owner), as a VMM given the fd would
    probe = (
        "import fcntl, os, struct, sys; fd = os.open('/dev/net/tun', os.O_RDWR); "
        "os.setgroups([]); os.setgid(65534); os.setuid(65534); "
        "fcntl.ioctl(fd, 0x400454CA, struct.pack('16sH22x', sys.argv[1].encode(), 0x5002))"
    )
    mine = subprocess.run(bare_ns.argv(sys.executable, "-c", probe, tap), capture_output=True)
    theirs = subprocess.run(bare_ns.argv(sys.executable, "-c", probe, other), capture_output=True)
    assert mine.returncode == 0, mine.stderr
    assert theirs.returncode != 0 and b"Operation not permitted" in theirs.stderr
    fd = bridge.open_tap_fd(tap, ns)
    try:
        with pytest.raises(bridge.NetDeviceError, match="holds it already"):
            bridge.open_tap_fd(tap, ns)
    finally:
        os.close(fd)
    with pytest.raises(bridge.NetDeviceError, match="create it first"):
        bridge.open_tap_fd(ipam.tap_name("nope"), ns)
    assert bridge.read_counters(tap, ns).tx_dropped >= 0
    assert bridge.delete_link(tap, ns) and not bridge.delete_link(tap, ns)
    assert bridge.delete_link(br, ns) and not bridge.delete_link(br, ns)
    assert [link.name for link in bridge.list_links(netns=ns)] == [other]


def test_dnsmasq_lifecycle_reload_and_zombie(bare_ns: tn.Netns) -> None:
    ns = bare_ns.name
    br = ipam.bridge_name("n2")
    plan = ipam.plan("10.66.0.0/24")
    bridge.ensure_bridge(br, plan.gateway_cidr, netns=ns)
    state = short_tmpdir("stkdns-")
    state.chmod(0o755)
    config = dnsmasq.DnsmasqConfig(br, plan.subnet, plan.gateway, state)
    try:
        proc = dnsmasq.start(config, [dnsmasq.DhcpHost("02:00:00:00:00:02", "10.66.0.2")], netns=ns)
        assert dnsmasq.is_running(proc) and dnsmasq.find_running(state) == proc
        assert _text(config.paths.hosts) == "02:00:00:00:00:02,10.66.0.2\n"
        reads = _text(config.paths.log).count("read " + str(config.paths.hosts))
        dnsmasq.write_hosts_file(config, [dnsmasq.DhcpHost("02:00:00:00:00:03", "10.66.0.3", "b")])
        dnsmasq.reload(proc)
        wait_for(
            lambda: _text(config.paths.log).count("read " + str(config.paths.hosts)) > reads, 5
        )
        assert dnsmasq.list_running(ns) == [proc]
        with pytest.raises(dnsmasq.DnsmasqError, match="already serves"):
            dnsmasq.start(  # it would start, and two DHCP servers would answer
                dnsmasq.DnsmasqConfig(br, plan.subnet, plan.gateway, state / "second"), netns=ns
            )
        with pytest.raises(
            dnsmasq.DnsmasqError, match=r"exited with code 1: .*unknown user .*no-such-user"
        ):
            dnsmasq.start(
                dnsmasq.DnsmasqConfig(
                    ipam.bridge_name("n3"),
                    plan.subnet,
                    plan.gateway,
                    state / "3",
                    user="no-such-user",
                ),
                netns=ns,
            )
        os.kill(proc.pid, 9)  # dies; stays a zombie until its parent (we) reaps it
        wait_for(lambda: Path(f"/proc/{proc.pid}/stat").read_text().split(") ")[1][0] == "Z", 5)
        assert not dnsmasq.is_running(proc) and dnsmasq.find_running(state) is None
        with pytest.raises(dnsmasq.DnsmasqError, match="not running"):
            dnsmasq.reload(proc)
        dnsmasq.stop(proc)  # reaps it; stopping a dead one is fine
        assert not Path(f"/proc/{proc.pid}").exists()
    finally:
        with contextlib.suppress(Exception):
            dnsmasq.stop(proc)
        shutil.rmtree(state, ignore_errors=True)
