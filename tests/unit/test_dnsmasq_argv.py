"""dnsmasq's command line, the static-lease file and the checks before a start."""

from __future__ import annotations

import dataclasses
import os
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from pathlib import Path
from typing import Any

import pytest

from stoker.host import dnsmasq as dm

BR = "stkb0123456789a"


def _config(state_dir: Path = Path("/var/lib/stoker/net/default"), **kw: Any) -> dm.DnsmasqConfig:
    base = dm.DnsmasqConfig(BR, IPv4Network("10.88.0.0/24"), IPv4Address("10.88.0.1"), state_dir)
    return dataclasses.replace(base, **kw)


def test_argv_serves_dhcp_on_the_bridge_only_and_reads_no_host_config() -> None:
    argv = dm.dnsmasq_argv(_config())
    assert argv[0] == "dnsmasq"
    for flag in (
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--log-facility=-",
        f"--interface={BR}",
        "--except-interface=lo",
        "--bind-dynamic",
        "--dhcp-range=10.88.0.0,static,255.255.255.0,1h",
        "--dhcp-hostsfile=/var/lib/stoker/net/default/dhcp-hosts",
        "--dhcp-leasefile=/var/lib/stoker/net/default/dnsmasq.leases",
        "--pid-file=/var/lib/stoker/net/default/dnsmasq.pid",
        "--dhcp-option=option:router,10.88.0.1",
        "--dhcp-authoritative",
    ):
        assert flag in argv
    assert not any(a.startswith("--user") for a in argv)  # dnsmasq's default: nobody


def test_dns_is_off_by_default_and_advertised_nowhere() -> None:
    argv = dm.dnsmasq_argv(_config())
    assert "--port=0" in argv and "--dhcp-option=option:dns-server" in argv
    assert not any(a.startswith("--server") for a in argv)


def test_dns_on_answers_only_for_its_own_domain() -> None:
    argv = dm.dnsmasq_argv(_config(dns=True, domain="default.stoker"))
    assert "--port=0" not in argv
    for flag in (
        "--no-resolv",
        "--no-hosts",
        "--no-poll",
        "--local-service",
        "--domain=default.stoker",
        "--local=/default.stoker/",
        "--dhcp-option=option:dns-server,10.88.0.1",
    ):
        assert flag in argv
    assert not any(a.startswith("--server") for a in argv)  # no upstream: nothing leaves


def test_ipv6_router_advertisements_and_user() -> None:
    argv = dm.dnsmasq_argv(
        _config(ipv6_subnet=IPv6Network("fd00:1::/64"), user="dnsmasq", lease_time="12h")
    )
    assert "--enable-ra" in argv
    assert f"--dhcp-range=::,constructor:{BR},ra-only,64,12h" in argv
    assert "--user=dnsmasq" in argv
    assert "--dhcp-range=10.88.0.0,static,255.255.255.0,12h" in argv


def test_hosts_file_lists_static_leases_by_address() -> None:
    text = dm.hosts_file_text(
        [
            dm.DhcpHost("02:00:00:00:00:0a", "10.88.0.10", "web-1"),
            dm.DhcpHost("02:00:00:00:00:02", "10.88.0.2"),
        ],
        IPv4Network("10.88.0.0/24"),
    )
    assert text == "02:00:00:00:00:02,10.88.0.2\n02:00:00:00:00:0a,10.88.0.10,web-1\n"
    assert dm.hosts_file_text([], IPv4Network("10.88.0.0/24")) == ""


@pytest.mark.parametrize(
    ("hosts", "hint"),
    [
        ([dm.DhcpHost("02:00:00:00:00:0A", "10.88.0.2")], "lower-case hex"),
        ([dm.DhcpHost("02:00:00:00:00", "10.88.0.2")], "six"),
        ([dm.DhcpHost("02:00:00:00:00:02", "10.89.0.2")], "outside 10.88.0.0/24"),
        ([dm.DhcpHost("02:00:00:00:00:02", "10.88.0.2", "Web_1")], "DNS label"),
        (
            [
                dm.DhcpHost("02:00:00:00:00:02", "10.88.0.2"),
                dm.DhcpHost("02:00:00:00:00:02", "10.88.0.3"),
            ],
            "MAC 02:00:00:00:00:02 appears twice",
        ),
        (
            [
                dm.DhcpHost("02:00:00:00:00:02", "10.88.0.2"),
                dm.DhcpHost("02:00:00:00:00:03", "10.88.0.2"),
            ],
            "address 10.88.0.2 appears twice",
        ),
    ],
)
def test_bad_leases_say_what_is_wrong(hosts: list[dm.DhcpHost], hint: str) -> None:
    with pytest.raises(dm.DnsmasqError, match=hint):
        dm.hosts_file_text(hosts, IPv4Network("10.88.0.0/24"))


def test_hosts_file_is_replaced_atomically_and_world_readable(tmp_path: Path) -> None:
    config = _config(tmp_path / "net")
    target = dm.write_hosts_file(config, [dm.DhcpHost("02:00:00:00:00:02", "10.88.0.2")])
    assert target == config.paths.hosts
    assert target.read_text() == "02:00:00:00:00:02,10.88.0.2\n"
    assert target.stat().st_mode & 0o777 == 0o644
    dm.write_hosts_file(config, [])
    assert target.read_text() == ""
    assert sorted(p.name for p in target.parent.iterdir()) == ["dhcp-hosts"]  # no temp files
    with pytest.raises(dm.DnsmasqError):
        dm.write_hosts_file(config, [dm.DhcpHost("bad", "10.88.0.2")])
    assert target.read_text() == ""  # a refused write leaves the old file


def test_start_refuses_a_state_dir_dnsmasq_cannot_reach(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    with pytest.raises(dm.DnsmasqError, match=rf"make {locked} searchable by others"):
        dm.start(_config(locked / "net"))
    assert not (locked / "net" / "dnsmasq.pid").exists()


def test_a_pid_that_is_not_our_dnsmasq_is_not_running(tmp_path: Path) -> None:
    assert dm.find_running(tmp_path) is None  # no pid file
    (tmp_path / "dnsmasq.pid").write_text(f"{os.getpid()}\n")  # a live process, not dnsmasq
    assert dm.find_running(tmp_path) is None
    me = dm.DnsmasqProcess(os.getpid(), 1, tmp_path / "dnsmasq.pid", BR)
    assert not dm.is_running(me)  # wrong start time, and not a dnsmasq
    with pytest.raises(dm.DnsmasqError, match="not running: start it again"):
        dm.reload(me)
    dm.stop(dm.DnsmasqProcess(2**22 + 1, 1, tmp_path / "dnsmasq.pid", BR))  # gone: fine
