"""Address management rules: subnet checks, the allocation cursor, MACs and interface names."""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stoker.domain import ipam

# --- subnets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["10.88.0.0/24", "172.31.255.248/29", "192.168.0.0/16"])
def test_private_subnets_of_usable_size_are_accepted(text: str) -> None:
    assert ipam.validate_subnet(text) == IPv4Network(text)


@pytest.mark.parametrize(
    ("text", "error", "hint"),
    [
        ("8.8.8.0/24", ipam.InvalidSubnet, "not private"),
        ("100.64.0.0/24", ipam.InvalidSubnet, "not private"),
        ("172.32.0.0/24", ipam.InvalidSubnet, "10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16"),
        ("10.0.0.0/8", ipam.InvalidSubnet, "between /16 and /29"),
        ("10.0.0.0/15", ipam.InvalidSubnet, "too large"),
        ("10.0.0.0/30", ipam.InvalidSubnet, "too small"),
        ("10.88.0.5/24", ipam.InvalidSubnet, "did you mean 10.88.0.0/24"),
        ("10.88.0.0", ipam.InvalidSubnet, "no prefix length"),
        ("10.88.0.0/33", ipam.InvalidSubnet, "CIDR"),
        ("fd00::/64", ipam.InvalidSubnet, "IPv4"),
        ("banana/24", ipam.InvalidSubnet, "for example 10.88.0.0/24"),
    ],
)
def test_bad_subnets_say_what_to_fix(text: str, error: type[Exception], hint: str) -> None:
    with pytest.raises(error, match=re.escape(hint)):
        ipam.validate_subnet(text)


def test_overlap_names_the_other_network() -> None:
    existing = {"network 'default'": "10.88.0.0/16", "host interface eth0": "192.168.1.0/24"}
    with pytest.raises(ipam.SubnetOverlap, match=r"overlaps network 'default' \(10\.88\.0\.0/16\)"):
        ipam.validate_subnet("10.88.5.0/24", existing)
    with pytest.raises(ipam.SubnetOverlap, match="host interface eth0"):
        ipam.validate_subnet("192.168.0.0/16", existing)
    assert ipam.validate_subnet("10.89.0.0/24", existing) == IPv4Network("10.89.0.0/24")


def test_plan_of_a_slash_24() -> None:
    p = ipam.plan("10.88.0.0/24")
    assert (str(p.gateway), str(p.pool_first), str(p.pool_last)) == (
        "10.88.0.1",
        "10.88.0.2",
        "10.88.0.254",
    )
    assert (p.pool_size, p.gateway_cidr, str(p.netmask)) == (253, "10.88.0.1/24", "255.255.255.0")
    assert ipam.gateway("192.168.7.0/29") == IPv4Address("192.168.7.1")
    assert ipam.plan("192.168.7.0/29").pool_size == 5


def test_check_address() -> None:
    assert ipam.check_address("10.88.0.0/24", "10.88.0.9") == "10.88.0.9"
    for reserved in ("10.88.0.0", "10.88.0.1", "10.88.0.255", "10.89.0.3"):
        with pytest.raises(ipam.InvalidAddress, match=r"pick one from 10\.88\.0\.2 to"):
            ipam.check_address("10.88.0.0/24", reserved)
    with pytest.raises(ipam.InvalidAddress, match="already taken"):
        ipam.check_address("10.88.0.0/24", "10.88.0.9", {"10.88.0.9"})
    with pytest.raises(ipam.InvalidAddress, match="not an IPv4 address"):
        ipam.check_address("10.88.0.0/24", "10.88.0")


# --- allocation ------------------------------------------------------------------------------


def test_allocate_walks_forward_and_wraps_only_at_the_end() -> None:
    net = "192.168.7.0/29"  # pool .2 .. .6
    taken: set[str] = set()
    cursor = None
    got = []
    for _ in range(5):
        address, cursor = ipam.allocate(net, taken, cursor)
        taken.add(address)
        got.append(address)
    assert got == [f"192.168.7.{i}" for i in range(2, 7)]
    with pytest.raises(ipam.PoolFull, match=r"all 5 are taken.*larger subnet"):
        ipam.allocate(net, taken, cursor)
    taken -= {"192.168.7.3", "192.168.7.5"}
    # the cursor sits at .6 (the end): the search wraps and finds .3 first
    assert ipam.allocate(net, taken, cursor) == ("192.168.7.3", "192.168.7.3")


def test_released_address_is_not_reused_before_the_end() -> None:
    taken = {"10.88.0.2", "10.88.0.3"}
    address, cursor = ipam.allocate("10.88.0.0/24", taken, "10.88.0.3")
    assert address == "10.88.0.4"
    taken.discard("10.88.0.2")  # released: a fresh pool address comes next
    assert ipam.allocate("10.88.0.0/24", taken | {address}, cursor)[0] == "10.88.0.5"


def test_cursor_outside_the_pool_starts_over() -> None:
    assert ipam.allocate("10.88.0.0/24", set(), "10.99.0.7")[0] == "10.88.0.2"
    assert ipam.allocate("10.88.0.0/24", set(), "10.88.0.1")[0] == "10.88.0.2"


def test_allocate_in_a_slash_16_is_fast() -> None:
    taken = {str(IPv4Address(int(IPv4Address("10.0.0.2")) + i)) for i in range(60_000)}
    address, _ = ipam.allocate("10.0.0.0/16", taken, None)
    assert address == str(IPv4Address(int(IPv4Address("10.0.0.2")) + 60_000))


_ops = st.lists(
    st.one_of(st.just(("alloc", 0)), st.tuples(st.just("release"), st.integers(0, 50))),
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(ops=_ops, prefix=st.sampled_from([28, 29]))
def test_allocation_properties(ops: list[tuple[str, int]], prefix: int) -> None:
    """Never one address for two VMs; never network, gateway or broadcast; each answer is the
    first free address after the cursor in cyclic order; and an address is handed out again
    only after the cursor went a full lap round the pool since it last handed it out (so a
    released address is not reused until the pool wraps)."""
    net = IPv4Network(f"10.20.30.0/{prefix}")
    layout = ipam.plan(net)
    pool = [IPv4Address(i) for i in range(int(layout.pool_first), int(layout.pool_last) + 1)]
    reserved = {net.network_address, layout.gateway, net.broadcast_address}
    owners: dict[str, int] = {}  # address -> VM number
    cursor: str | None = None
    travelled = 0  # how far the cursor moved forward in total, counting laps
    handed_at: dict[str, int] = {}  # address -> `travelled` when it was last handed out
    for vm, (op, arg) in enumerate(ops):
        if op == "release":
            if owners:
                del owners[sorted(owners)[arg % len(owners)]]
            continue
        try:
            address, new_cursor = ipam.allocate(net, set(owners), cursor)
        except ipam.PoolFull:
            assert len(owners) == layout.pool_size
            continue
        ip = IPv4Address(address)
        assert ip in net and ip not in reserved and layout.in_pool(ip)
        assert address not in owners and new_cursor == address
        at = -1 if cursor is None else pool.index(IPv4Address(cursor))
        ahead = pool[at + 1 :] + pool[: at + 1]
        assert ip == next(a for a in ahead if str(a) not in owners)
        travelled += ahead.index(ip) + 1
        if address in handed_at:
            assert travelled - handed_at[address] >= len(pool), f"{address} reused within a lap"
        handed_at[address] = travelled
        owners[address] = vm
        cursor = new_cursor


# --- MACs and names --------------------------------------------------------------------------


@given(st.text(min_size=1, max_size=40))
def test_mac_is_stable_local_unicast(vm_id: str) -> None:
    mac = ipam.mac_for_vm(vm_id)
    assert mac == ipam.mac_for_vm(vm_id)
    first = int(mac[:2], 16)
    assert first & 0b10 and not first & 0b01
    assert len(mac.split(":")) == 6


def test_bridge_mac_is_stable_local_unicast_and_not_a_vms() -> None:
    mac = ipam.bridge_mac("default")
    assert mac == ipam.bridge_mac("default") != ipam.bridge_mac("other")
    assert int(mac[:2], 16) & 0b11 == 0b10
    assert mac != ipam.mac_for_vm("default")


def test_macs_differ_between_vms() -> None:
    macs = {ipam.mac_for_vm(f"{i:016x}") for i in range(5000)}
    assert len(macs) == 5000


@given(st.text(min_size=1, max_size=80))
def test_interface_names_fit_and_are_recognised(some_id: str) -> None:
    tap, bridge = ipam.tap_name(some_id), ipam.bridge_name(some_id)
    assert len(tap.encode()) == len(bridge.encode()) == 15
    assert tap.startswith("stkt") and bridge.startswith("stkb") and tap != bridge
    assert ipam.ifname_kind(tap) == "tap" and ipam.ifname_kind(bridge) == "bridge"
    assert tap == ipam.tap_name(some_id)


@pytest.mark.parametrize(
    "name", ["eth0", "stk", "stktXYZ", "stkt0123456789", "virbr0", "stkx0123456789a"]
)
def test_foreign_names_are_not_stokers(name: str) -> None:
    assert not ipam.is_stoker_ifname(name)


def test_ipv6_ula_and_slaac() -> None:
    net6 = ipam.ula_subnet("default")
    assert net6.prefixlen == 64 and net6.subnet_of(IPv6Network("fd00::/8"))
    assert net6 == ipam.ula_subnet("default") != ipam.ula_subnet("default", host_key="other")
    assert ipam.ula_gateway(net6) == net6.network_address + 1
    # RFC 4291 appendix A example: 52:54:00:12:34:56 -> 5054:ff:fe12:3456
    got = ipam.slaac_address(IPv6Network("fd00:1::/64"), "52:54:00:12:34:56")
    assert got == IPv6Address("fd00:1::5054:ff:fe12:3456")
