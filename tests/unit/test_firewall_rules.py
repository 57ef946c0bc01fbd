"""The nft JSON stoker builds, and reading it back, without touching the kernel.

``_listed`` turns the ``add rule`` commands into what ``nft -j list table`` prints for them
(the same rule objects plus handles), so plans can be checked round trip.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from ipaddress import IPv4Network, IPv6Network
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stoker.host import nft_rules as nr
from stoker.host.firewall import forward_blockers

BR = "stkb0123456789a"
TAP = "stkt0123456789a"
NET = nr.NetworkRules("default", BR, IPv4Network("10.88.0.0/24"))


def _listed(commands: Sequence[dict[str, Any]], counters: int = 0) -> dict[str, Any]:
    """What nft would list after running ``commands`` on empty tables."""
    handles = itertools.count(1)
    items: list[dict[str, Any]] = []
    for cmd in commands:
        [(verb, body)] = cmd.items()
        [(kind, obj)] = body.items()
        assert verb in ("add", "flush"), cmd
        if verb != "add":
            continue
        obj = dict(obj)
        if kind == "rule":
            obj["expr"] = [
                {"counter": {"packets": counters, "bytes": 0}} if "counter" in e else e
                for e in obj["expr"]
            ]
        items.append({kind: {**obj, "handle": next(handles)}})
    return {"nftables": [{"metainfo": {"json_schema_version": 1}}, *items]}


def _rules(commands: Sequence[dict[str, Any]], chain: str | None = None) -> list[dict[str, Any]]:
    rules = [c["add"]["rule"] for c in commands if "rule" in c.get("add", {})]
    return [r for r in rules if chain is None or r["chain"] == chain]


def _flat(rule: dict[str, Any]) -> str:
    return repr(rule["expr"])


# --- tables and networks ---------------------------------------------------------------------


def test_base_chains_hook_where_they_must() -> None:
    cmds = nr.base_commands()
    assert cmds[0] == {"add": {"table": {"family": "inet", "name": "stoker"}}}
    chains = {c["add"]["chain"]["name"]: c["add"]["chain"] for c in cmds[1:]}
    assert {n: (c["type"], c["hook"], c["prio"]) for n, c in chains.items()} == {
        "guard": ("filter", "prerouting", -300),
        "prerouting": ("nat", "prerouting", -100),
        "output": ("nat", "output", -100),
        "postrouting": ("nat", "postrouting", 100),
        "forward": ("filter", "forward", 0),
    }
    assert all(c["policy"] == "accept" and c["family"] == "inet" for c in chains.values())


def test_network_masquerades_its_subnet_out_of_anything_but_the_bridge() -> None:
    (masq, *_) = _rules(nr.network_rules(NET), "postrouting")
    assert masq["expr"] == [
        {
            "match": {
                "op": "==",
                "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                "right": {"prefix": {"addr": "10.88.0.0", "len": 24}},
            }
        },
        {"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": BR}},
        {"masquerade": None},
    ]
    assert masq["comment"] == "stoker net=default"
    uplinked = nr.network_rules(nr.NetworkRules("default", BR, NET.subnet, uplink="eth0"))
    assert "'right': 'eth0'" in _flat(_rules(uplinked, "postrouting")[0])


def test_every_forward_rule_is_keyed_on_the_network_it_enters() -> None:
    for isolated in (True, False):
        net = nr.NetworkRules("default", BR, NET.subnet, isolated=isolated)
        forward = _rules(nr.network_rules(net), "forward")
        oif = {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": BR}}
        assert all(rule["expr"][0] == oif for rule in forward)
        assert forward[-1]["expr"] == [oif, {"drop": None}]  # the rest: nothing new gets in
        guest_to_guest = [r for r in forward if "iifname" in _flat(r)]
        assert len(guest_to_guest) == (0 if isolated else 1)


def test_loopback_guard_and_localhost_masquerade() -> None:
    rules = nr.network_rules(NET)
    guard = _rules(rules, "guard")
    assert len(guard) == 2 and all(r["expr"][-1] == {"drop": None} for r in guard)
    assert all("127.0.0.0" in _flat(r) and "iifname" in _flat(r) for r in guard)
    post = _rules(rules, "postrouting")
    assert any("127.0.0.0" in _flat(r) and "masquerade" in _flat(r) for r in post)


def test_ipv6_subnet_is_masqueraded_too() -> None:
    net = nr.NetworkRules("default", BR, NET.subnet, ipv6_subnet=IPv6Network("fd00:1::/64"))
    post = _rules(nr.network_rules(net), "postrouting")
    assert any("'ip6'" in _flat(r) and "fd00:1::" in _flat(r) for r in post)
    assert not any("'ip6'" in _flat(r) for r in _rules(nr.network_rules(NET)))


@pytest.mark.parametrize(
    ("net", "hint"),
    [
        (nr.NetworkRules("bad name", BR, NET.subnet), "network name"),
        (nr.NetworkRules("ok", "br;drop", NET.subnet), "bridge name"),
    ],
)
def test_bad_names_are_refused(net: nr.NetworkRules, hint: str) -> None:
    with pytest.raises(nr.FirewallError, match=hint):
        nr.network_rules(net)


def test_set_network_replaces_its_own_rules_only() -> None:
    other = nr.NetworkRules("other", "stkbffffffffff0", IPv4Network("10.89.0.0/24"))
    state = nr.parse_state(
        _listed([*nr.base_commands(), *nr.network_rules(NET), *nr.network_rules(other)])
    )
    assert state.networks == {"default", "other"}
    cmds = nr.set_network_commands(state, nr.NetworkRules("default", BR, NET.subnet, False))
    deleted = {c["delete"]["rule"]["handle"] for c in cmds if "delete" in c}
    default_handles = {r.handle for r in state.rules if r.tags.get("net") == "default"}
    assert deleted == default_handles
    assert {r["comment"] for r in _rules(cmds)} == {"stoker net=default"}
    assert nr.remove_network_commands(state, "other") == [
        {
            "delete": {
                "rule": {"family": "inet", "table": "stoker", "chain": r.chain, "handle": r.handle}
            }
        }
        for r in state.rules
        if r.tags.get("net") == "other"
    ]


# --- port forwards ---------------------------------------------------------------------------

F = nr.PortForward


def test_forward_dnats_in_prerouting_and_output() -> None:
    fwd = F("vm1", "tcp", "127.0.0.1", 8080, "10.88.0.5", 80)
    pre, out = nr.forward_rules(fwd)
    assert pre["add"]["rule"]["chain"] == "prerouting" and out["add"]["rule"]["chain"] == "output"
    expr = pre["add"]["rule"]["expr"]
    assert expr == out["add"]["rule"]["expr"]
    assert expr[0]["match"]["right"] == "127.0.0.1"
    assert expr[1] == {
        "match": {
            "op": "==",
            "left": {"payload": {"protocol": "tcp", "field": "dport"}},
            "right": 8080,
        }
    }
    assert expr[2] == {"dnat": {"family": "ip", "addr": "10.88.0.5", "port": 80}}
    assert pre["add"]["rule"]["comment"] == "stoker vm=vm1 fwd=tcp,127.0.0.1,8080,10.88.0.5,80"


def test_forward_on_every_address_matches_local_destinations() -> None:
    (pre, _) = nr.forward_rules(F("vm1", "udp", "0.0.0.0", 5353, "10.88.0.5", 53))
    assert pre["add"]["rule"]["expr"][0] == {
        "match": {
            "op": "==",
            "left": {"fib": {"result": "type", "flags": ["daddr"]}},
            "right": "local",
        }
    }


@pytest.mark.parametrize(
    ("fwd", "hint"),
    [
        (F("vm1", "tcp", "0.0.0.0", 0, "10.88.0.5", 80), "host port 0"),
        (F("vm1", "tcp", "0.0.0.0", 80, "10.88.0.5", 70000), "guest port 70000"),
        (F("vm1", "tcp", "localhost", 80, "10.88.0.5", 80), "host address 'localhost'"),
        (F("vm1", "tcp", "0.0.0.0", 80, "10.88.0", 80), "guest address"),
        (F("vm1", "sctp", "0.0.0.0", 80, "10.88.0.5", 80), "tcp or udp"),  # type: ignore[arg-type]  # a bad protocol on purpose
        (F("vm 1", "tcp", "0.0.0.0", 80, "10.88.0.5", 80), "VM id"),
    ],
)
def test_bad_forwards_say_what_to_fix(fwd: nr.PortForward, hint: str) -> None:
    with pytest.raises(nr.FirewallError, match=hint):
        nr.forward_rules(fwd)


def test_forward_conflicts() -> None:
    mine = [F("vm1", "tcp", "0.0.0.0", 8080, "10.88.0.5", 80)]
    with pytest.raises(nr.ForwardConflict, match=r"taken by VM vm1 .*choose another host port"):
        nr.check_forward_conflicts(mine, [F("vm2", "tcp", "127.0.0.1", 8080, "10.88.0.6", 80)])
    nr.check_forward_conflicts(mine, [F("vm2", "udp", "0.0.0.0", 8080, "10.88.0.6", 80)])
    nr.check_forward_conflicts(mine, [F("vm1", "tcp", "0.0.0.0", 8080, "10.88.0.5", 81)])  # own
    specific = [F("vm1", "tcp", "127.0.0.1", 8080, "10.88.0.5", 80)]
    nr.check_forward_conflicts(specific, [F("vm2", "tcp", "127.0.0.2", 8080, "10.88.0.6", 80)])
    with pytest.raises(nr.ForwardConflict, match="taken by this VM"):
        nr.check_forward_conflicts(
            [],
            [
                F("vm1", "tcp", "0.0.0.0", 9000, "10.88.0.5", 80),
                F("vm1", "tcp", "127.0.0.1", 9000, "10.88.0.5", 81),
            ],
        )


def test_set_forwards_replaces_one_vms_forwards() -> None:
    old = [F("vm1", "tcp", "0.0.0.0", 8080, "10.88.0.5", 80)]
    theirs = [F("vm2", "tcp", "0.0.0.0", 8081, "10.88.0.6", 80)]
    cmds = [*nr.base_commands(), *nr.forward_rules(old[0]), *nr.forward_rules(theirs[0])]
    state = nr.parse_state(_listed(cmds))
    assert state.forwards == tuple(sorted(old + theirs))
    assert state.forwards_of("vm1") == old
    new = [F("vm1", "tcp", "0.0.0.0", 8082, "10.88.0.5", 80)]
    plan = nr.set_forwards_commands(state, "vm1", new)
    deleted = {c["delete"]["rule"]["handle"] for c in plan if "delete" in c}
    assert deleted == {r.handle for r in state.rules if r.tags.get("vm") == "vm1"}
    assert [r["comment"] for r in _rules(plan)] == [
        "stoker vm=vm1 fwd=tcp,0.0.0.0,8082,10.88.0.5,80"
    ] * 2
    removal = nr.set_forwards_commands(state, "vm1", [])
    assert all("delete" in c for c in removal) and len(removal) == 2
    with pytest.raises(nr.FirewallError, match="belongs to VM vm2"):
        nr.set_forwards_commands(state, "vm1", theirs)
    with pytest.raises(nr.ForwardConflict, match="same port forward twice"):
        nr.set_forwards_commands(state, "vm1", new + new)


_forward = st.builds(
    F,
    vm=st.sampled_from(["a1", "b2", "c3"]),
    protocol=st.sampled_from(["tcp", "udp"]),
    host_addr=st.sampled_from(["0.0.0.0", "127.0.0.1", "203.0.113.1"]),
    host_port=st.integers(1, 65535),
    guest_addr=st.ip_addresses(v=4).map(str),
    guest_port=st.integers(1, 65535),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(_forward, max_size=8, unique_by=lambda f: (f.protocol, f.host_port)))
def test_forwards_round_trip_through_the_listing(forwards: list[nr.PortForward]) -> None:
    cmds = list(nr.base_commands())
    for fwd in forwards:
        cmds += nr.forward_rules(fwd)
    state = nr.parse_state(_listed(cmds))
    assert state.forwards == tuple(sorted(forwards))
    assert state.vms == {f.vm for f in forwards}


# --- TAP limits ------------------------------------------------------------------------------


def test_limits_hook_both_directions_of_the_tap() -> None:
    limits = nr.TapLimits("vm1", TAP, guest_rx_pps=1000, guest_tx_bytes_per_s=1_250_000)
    cmds = nr.limit_commands(limits)
    assert cmds[0] == {"add": {"table": {"family": "netdev", "name": "stoker"}}}
    chains = {
        c["add"]["chain"]["name"]: c["add"]["chain"] for c in cmds if "chain" in c.get("add", {})
    }
    assert (chains[f"in_{TAP}"]["hook"], chains[f"out_{TAP}"]["hook"]) == ("ingress", "egress")
    assert all(c["dev"] == TAP and c["type"] == "filter" for c in chains.values())
    assert [c["flush"]["chain"]["name"] for c in cmds if "flush" in c] == [
        f"in_{TAP}",
        f"out_{TAP}",
    ]
    by_chain = {r["chain"]: r for r in _rules(cmds)}
    tx = by_chain[f"in_{TAP}"]["expr"]
    assert tx[0]["limit"] == {
        "rate": 1_250_000,
        "rate_unit": "bytes",
        "per": "second",
        "burst": 131_072,  # more than one 64 KiB GSO frame
        "burst_unit": "bytes",
        "inv": True,
    }
    assert tx[1:] == [{"counter": None}, {"drop": None}]
    rx = by_chain[f"out_{TAP}"]["expr"]
    assert rx[0]["limit"] == {"rate": 1000, "per": "second", "burst": 100, "inv": True}


def test_limits_round_trip_with_drop_counts_and_removal() -> None:
    limits = nr.TapLimits("vm1", TAP, guest_rx_pps=1000, guest_tx_pps=10, guest_tx_bytes_per_s=5)
    state = nr.parse_state(_listed(nr.limit_commands(limits), counters=7))
    assert state.limits == (limits,) and state.limits_of("vm1") == [limits]
    assert state.dropped == {(TAP, "guest_tx"): 14, (TAP, "guest_rx"): 7}
    assert state.limit_chains == {f"in_{TAP}", f"out_{TAP}"}
    # dropping the receive limits deletes that chain and rewrites the other
    cmds = nr.limit_commands(nr.TapLimits("vm1", TAP, guest_tx_pps=10), state)
    assert {
        "delete": {"chain": {"family": "netdev", "table": "stoker", "name": f"out_{TAP}"}}
    } in cmds
    assert nr.remove_limits_commands(state, TAP) == [
        {"delete": {"chain": {"family": "netdev", "table": "stoker", "name": f"{d}_{TAP}"}}}
        for d in ("in", "out")
    ]
    assert nr.limit_commands(nr.TapLimits("vm1", TAP)) == []  # nothing there, nothing to do
    assert nr.remove_vm_commands(state, "vm1") == nr.remove_limits_commands(state, TAP)


@pytest.mark.parametrize("bad", [0, -5, 1.5, True])
def test_bad_rates_are_refused(bad: Any) -> None:
    with pytest.raises(nr.FirewallError, match="guest_rx_pps must be a positive whole number"):
        nr.limit_commands(nr.TapLimits("vm1", TAP, guest_rx_pps=bad))


# --- reading, reconciling, destroying --------------------------------------------------------


def test_parse_ignores_rules_that_are_not_stokers() -> None:
    listing = _listed(nr.base_commands())
    listing["nftables"] += [
        {
            "rule": {
                "family": "inet",
                "table": "stoker",
                "chain": "forward",
                "handle": 99,
                "expr": [],
            }
        },
        {
            "rule": {
                "family": "ip",
                "table": "filter",
                "chain": "FORWARD",
                "handle": 3,
                "comment": "stoker net=x",
                "expr": [],
            }
        },
    ]
    state = nr.parse_state(listing)
    assert state == nr.FirewallState(inet_exists=True)


def test_reconcile_keeps_the_listed_and_drops_the_rest() -> None:
    ghost_tap = "stktffffffffff1"
    cmds = [
        *nr.base_commands(),
        *nr.network_rules(NET),
        *nr.network_rules(nr.NetworkRules("old", "stkbffffffffff1", IPv4Network("10.9.0.0/24"))),
        *nr.forward_rules(F("vm1", "tcp", "0.0.0.0", 8080, "10.88.0.5", 80)),
        *nr.forward_rules(F("ghost", "tcp", "0.0.0.0", 8081, "10.88.0.9", 80)),
        *nr.limit_commands(nr.TapLimits("vm1", TAP, guest_rx_pps=5)),
        *nr.limit_commands(nr.TapLimits("ghost", ghost_tap, guest_tx_pps=5)),
    ]
    state = nr.parse_state(_listed(cmds))
    plan = nr.reconcile_commands(state, networks={"default"}, vms={"vm1"})
    deleted = {c["delete"]["rule"]["handle"] for c in plan if "rule" in c["delete"]}
    old_network = {r.handle for r in state.rules if r.tags.get("net") == "old"}
    ghost_forwards = {
        r.handle for r in state.rules if r.tags.get("vm") == "ghost" and "fwd" in r.tags
    }
    assert deleted == old_network | ghost_forwards
    chains = [c["delete"]["chain"]["name"] for c in plan if "chain" in c["delete"]]
    assert chains == [f"in_{ghost_tap}"]
    assert nr.reconcile_commands(state, {"default", "old"}, {"vm1", "ghost"}) == []


def test_destroy_deletes_only_existing_tables() -> None:
    assert nr.destroy_commands(nr.FirewallState()) == []
    assert nr.destroy_commands(nr.FirewallState(inet_exists=True, netdev_exists=True)) == [
        {"delete": {"table": {"family": "inet", "name": "stoker"}}},
        {"delete": {"table": {"family": "netdev", "name": "stoker"}}},
    ]


def test_forward_blockers_names_other_tables_drop_chains() -> None:
    listing = {
        "nftables": [
            {
                "chain": {
                    "family": "ip",
                    "table": "filter",
                    "name": "FORWARD",
                    "hook": "forward",
                    "policy": "drop",
                }
            },
            {
                "chain": {
                    "family": "inet",
                    "table": "fw",
                    "name": "fwd",
                    "hook": "forward",
                    "policy": "accept",
                }
            },
            {
                "chain": {
                    "family": "inet",
                    "table": "stoker",
                    "name": "forward",
                    "hook": "forward",
                    "policy": "drop",
                }
            },
            {
                "chain": {
                    "family": "ip",
                    "table": "filter",
                    "name": "INPUT",
                    "hook": "input",
                    "policy": "drop",
                }
            },
        ]
    }
    assert forward_blockers(listing) == ["table ip filter chain FORWARD"]
