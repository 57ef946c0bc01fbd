"""stoker's nftables rules as nft JSON, built and read back by pure functions.

Two tables of stoker's own, nothing else on the host is read or touched:

- ``inet stoker``: outbound NAT (masquerade) per network, port forwards (DNAT) per VM for
  traffic from elsewhere (``prerouting``) and from the host itself (``output``), a
  ``forward`` chain that lets into a network only forwarded ports and replies (and, for an
  ``open`` network, its own guests), and a ``guard`` chain (see below).
- ``netdev stoker``: per-TAP rate limits, a chain per TAP and direction: ``in_TAP`` on the
  TAP's ingress hook (what the guest sends), ``out_TAP`` on its egress hook (what the guest
  receives): ``limit rate over N/second counter drop`` (the counter counts the drops).

Every rule carries a comment saying whose it is and everything needed to list it again
(``stoker net=NAME``, ``stoker vm=ID fwd=tcp,HOST,PORT,GUEST,PORT``, ``stoker vm=ID
tap=TAP dir=in unit=packets rate=N``), so listing, removal and reconciliation read the
kernel's ruleset rather than a copy of it that could drift. The ``*_commands`` functions
turn "what is there" (:func:`parse_state`) plus "what is wanted" into one batch for one
atomic ``nft -j -f -`` run (:mod:`stoker.host.firewall` runs it).

Measured on the development machines (kernel 6.18, nft 1.0.6), and why the rules look so:

- A forward on 127.0.0.1 used from the host itself needs ``route_localnet=1`` on the bridge
  (without it the kernel will not route a 127/8 source off loopback: the request hangs) and
  masquerading of 127/8 sources leaving through the bridge, as Docker does. Since
  ``route_localnet`` would also let guests send to the host's loopback services, the
  ``guard`` chain drops 127/8 to or from the bridge before routing (kube-proxy's answer to
  CVE-2020-8558).
- ``br_netfilter`` is active here (``bridge-nf-call-iptables=1``): frames bridged between
  two guests pass the ``forward`` hook with the bridge as input and output device. So the
  ``forward`` rules also enforce isolation at layer 2, and an ``open`` network needs its
  accept rule. It also means a guest cannot use a forward of its own network through the
  host (hairpin) on an isolated network: br_netfilter bridges the DNATed frame straight to
  the target port, which port isolation drops. Without br_netfilter the hairpin masquerade
  rule makes it work (measured with ``bridge-nf-call-iptables=0``).
- nft's byte limit holds one second of rate plus the burst in its bucket: a 4 MB transfer
  under a 10 Mbit/s limit ran at 13.9 to 14.5 Mbit/s (the first second passes at once), a
  12 MB one at 10.2 Mbit/s. tbf (:mod:`stoker.host.netlimits`) gave 9.5 to 9.6 Mbit/s of TCP
  goodput for the same 10 Mbit/s in both directions. So bandwidth belongs to tbf; the byte
  limit here is a policing fallback for hosts where tc cannot shape guest transmit.
- Packets are frames as the TAP sees them: with QEMU's vnet_hdr offloads the host hands the
  guest GSO frames of up to 64 KiB (about 45 KB on average in a download), so a packet-rate
  limit caps frames, not MTU-sized packets; byte limits get a burst of at least 128 KiB or a
  64 KiB frame could never pass.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from typing import Any, Literal

__all__ = [
    "TABLE",
    "FirewallError",
    "FirewallState",
    "ForwardConflict",
    "NetworkRules",
    "PortForward",
    "TapLimits",
    "base_commands",
    "check_forward_conflicts",
    "destroy_commands",
    "forward_rules",
    "limit_commands",
    "network_rules",
    "parse_state",
    "reconcile_commands",
    "remove_limits_commands",
    "remove_network_commands",
    "remove_vm_commands",
    "set_forwards_commands",
    "set_network_commands",
]

TABLE = "stoker"
TAG = "stoker"
LIMIT_PRIORITY = -100
MIN_BYTE_BURST = 128 * 1024  # more than one 64 KiB GSO frame
MIN_PACKET_BURST = 5

Json = dict[str, Any]
Protocol = Literal["tcp", "udp"]
Direction = Literal["in", "out"]
Unit = Literal["packets", "bytes"]
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_.:/-]{1,64}$")

# the base chains of ``inet stoker``: name -> (type, hook, priority)
_INET_CHAINS: dict[str, tuple[str, str, int]] = {
    "guard": ("filter", "prerouting", -300),  # raw: before conntrack and NAT
    "prerouting": ("nat", "prerouting", -100),  # dstnat
    "output": ("nat", "output", -100),
    "postrouting": ("nat", "postrouting", 100),  # srcnat
    "forward": ("filter", "forward", 0),
}
# (direction, unit) -> the TapLimits field it fills
_LIMIT_FIELDS: dict[tuple[str, str], str] = {
    ("in", "packets"): "guest_tx_pps",
    ("out", "packets"): "guest_rx_pps",
    ("in", "bytes"): "guest_tx_bytes_per_s",
    ("out", "bytes"): "guest_rx_bytes_per_s",
}


class FirewallError(RuntimeError):
    """A rule cannot be built or nft refused it; the message says what to fix."""


class ForwardConflict(FirewallError):
    """A port forward would take a host port that another forward uses."""


# --- the data --------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetworkRules:
    """One managed network as the firewall sees it."""

    name: str
    bridge: str
    subnet: IPv4Network
    isolated: bool = True  # guests never reach each other, not even routed via the gateway
    ipv6_subnet: IPv6Network | None = None  # masqueraded too: a ULA is not routable outside
    uplink: str | None = None  # masquerade only out of this device; None: any but the bridge


@dataclass(frozen=True, order=True)
class PortForward:
    """``protocol host_addr:host_port -> guest_addr:guest_port`` for one VM.

    ``host_addr`` 0.0.0.0 means every local address of the host, 127.0.0.1 included.
    """

    vm: str
    protocol: Protocol
    host_addr: str
    host_port: int
    guest_addr: str
    guest_port: int

    def describe(self) -> str:
        return (
            f"{self.protocol} {self.host_addr}:{self.host_port} -> "
            f"{self.guest_addr}:{self.guest_port}"
        )


@dataclass(frozen=True)
class TapLimits:
    """Rate limits on one VM's TAP, per direction as the guest sees it; None: no limit."""

    vm: str
    tap: str
    guest_rx_pps: int | None = None
    guest_tx_pps: int | None = None
    guest_rx_bytes_per_s: int | None = None
    guest_tx_bytes_per_s: int | None = None


@dataclass(frozen=True)
class OwnedRule:
    """A rule in stoker's tables with its handle and the tags of its comment."""

    family: str
    chain: str
    handle: int
    tags: Mapping[str, str]


@dataclass(frozen=True)
class FirewallState:
    """What stoker's tables hold, as read back from the kernel."""

    networks: frozenset[str] = frozenset()
    forwards: tuple[PortForward, ...] = ()
    limits: tuple[TapLimits, ...] = ()
    #: packets dropped by each TAP's limits: (tap, "guest_rx" | "guest_tx") -> packets
    dropped: Mapping[tuple[str, str], int] = field(default_factory=dict)
    inet_exists: bool = False
    netdev_exists: bool = False
    rules: tuple[OwnedRule, ...] = field(default=(), repr=False)
    limit_chains: frozenset[str] = field(default=frozenset(), repr=False)

    def forwards_of(self, vm: str) -> list[PortForward]:
        return [f for f in self.forwards if f.vm == vm]

    def limits_of(self, vm: str) -> list[TapLimits]:
        return [lim for lim in self.limits if lim.vm == vm]

    @property
    def vms(self) -> frozenset[str]:
        return frozenset(f.vm for f in self.forwards) | frozenset(x.vm for x in self.limits)


# --- validation ------------------------------------------------------------------------------


def _token(value: str, what: str) -> str:
    if not isinstance(value, str) or not _TOKEN_RE.fullmatch(value):
        raise FirewallError(f"{what} {value!r} must be 1-64 of A-Z a-z 0-9 _ . : / -")
    return value


def _port(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise FirewallError(f"{what} {value!r} must be a port number from 1 to 65535")
    return value


def _rate(value: int | None, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise FirewallError(f"{what} must be a positive whole number, not {value!r}")
    return value


def _check_forward(fwd: PortForward) -> None:
    _token(fwd.vm, "VM id")
    if fwd.protocol not in ("tcp", "udp"):
        raise FirewallError(f"protocol {fwd.protocol!r} must be tcp or udp")
    for addr, what in ((fwd.host_addr, "host address"), (fwd.guest_addr, "guest address")):
        try:
            IPv4Address(addr)
        except ValueError as exc:
            raise FirewallError(f"{what} {addr!r} is not an IPv4 address") from exc
    _port(fwd.host_port, "host port")
    _port(fwd.guest_port, "guest port")


def check_forward_conflicts(existing: Iterable[PortForward], new: Iterable[PortForward]) -> None:
    """Refuse two forwards on one host port and protocol (0.0.0.0 overlaps every address).

    The new forwards' VMs are having theirs replaced, so their old ones do not count.
    """
    wanted = list(new)
    replaced = {f.vm for f in wanted}
    seen = [f for f in existing if f.vm not in replaced]
    for fwd in wanted:
        for other in seen:
            if (other.protocol, other.host_port) != (fwd.protocol, fwd.host_port):
                continue
            if "0.0.0.0" in (other.host_addr, fwd.host_addr) or other.host_addr == fwd.host_addr:
                whose = "this VM" if other.vm == fwd.vm else f"VM {other.vm}"
                raise ForwardConflict(
                    f"host port {fwd.protocol} {fwd.host_addr}:{fwd.host_port} is taken by "
                    f"{whose} ({other.describe()}): choose another host port"
                )
        seen.append(fwd)


# --- nft JSON building blocks ----------------------------------------------------------------


def _match(left: Json, right: Any, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> Json:
    return {"meta": {"key": key}}


def _payload(protocol: str, name: str) -> Json:
    return {"payload": {"protocol": protocol, "field": name}}


def _prefix(net: IPv4Network | IPv6Network) -> Json:
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _comment(**tags: str | int) -> str:
    text = " ".join([TAG, *(f"{k}={v}" for k, v in tags.items())])
    if len(text) > 128:
        raise FirewallError(f"rule comment too long ({len(text)} > 128 bytes): {text}")
    return text


def _parse_comment(text: object) -> dict[str, str] | None:
    if not isinstance(text, str) or not text.startswith(TAG + " "):
        return None
    tags = {}
    for part in text.split()[1:]:
        key, sep, value = part.partition("=")
        if sep:
            tags[key] = value
    return tags


def _rule(family: str, chain: str, expr: list[Json], comment: str) -> Json:
    return {
        "add": {
            "rule": {
                "family": family,
                "table": TABLE,
                "chain": chain,
                "expr": expr,
                "comment": comment,
            }
        }
    }


def _delete_rule(rule: OwnedRule) -> Json:
    return {
        "delete": {
            "rule": {
                "family": rule.family,
                "table": TABLE,
                "chain": rule.chain,
                "handle": rule.handle,
            }
        }
    }


def _delete_chain(family: str, chain: str) -> Json:
    return {"delete": {"chain": {"family": family, "table": TABLE, "name": chain}}}


def base_commands() -> list[Json]:
    """Create ``inet stoker`` and its base chains (``add`` is idempotent in nft)."""
    cmds: list[Json] = [{"add": {"table": {"family": "inet", "name": TABLE}}}]
    for name, (kind, hook, prio) in _INET_CHAINS.items():
        chain = {"family": "inet", "table": TABLE, "name": name, "type": kind, "hook": hook}
        cmds.append({"add": {"chain": {**chain, "prio": prio, "policy": "accept"}}})
    return cmds


def network_rules(net: NetworkRules) -> list[Json]:
    """The rules of one network: the loopback guard, NAT out, and what may enter it.

    Every ``forward`` rule matches the network's own bridge as the *output* device, so a
    packet's fate depends only on the network it enters, whatever order networks were added
    in. A guest's traffic out needs no rule: the chain's policy is accept.
    """
    _token(net.name, "network name")
    _token(net.bridge, "bridge name")
    tag = _comment(net=net.name)
    br_in = _match(_meta("iifname"), net.bridge)
    br_out = _match(_meta("oifname"), net.bridge)
    dnat = _match({"ct": {"key": "status"}}, "dnat", "in")
    established = _match({"ct": {"key": "state"}}, ["established", "related"], "in")
    from_subnet = _match(_payload("ip", "saddr"), _prefix(net.subnet))
    out_dev = (
        _match(_meta("oifname"), net.uplink)
        if net.uplink
        else _match(_meta("oifname"), net.bridge, "!=")
    )
    loopback = _prefix(IPv4Network("127.0.0.0/8"))
    masquerade: Json = {"masquerade": None}
    accept: Json = {"accept": None}
    drop: Json = {"drop": None}
    rules = [
        # route_localnet on the bridge must not open the host's loopback to guests
        _rule("inet", "guard", [br_in, _match(_payload("ip", "daddr"), loopback), drop], tag),
        _rule("inet", "guard", [br_in, _match(_payload("ip", "saddr"), loopback), drop], tag),
        # outbound NAT
        _rule("inet", "postrouting", [from_subnet, out_dev, masquerade], tag),
        # the host itself using a forward on 127.0.0.1: the guest must answer the gateway
        _rule(
            "inet",
            "postrouting",
            [br_out, _match(_payload("ip", "saddr"), loopback), masquerade],
            tag,
        ),
        # a guest using a forward into its own network (hairpin; postrouting knows no input
        # device, hence the source subnet)
        _rule("inet", "postrouting", [from_subnet, br_out, dnat, masquerade], tag),
        # into the network: forwarded ports and replies; guest to guest only when open
        _rule("inet", "forward", [br_out, dnat, accept], tag),
        _rule("inet", "forward", [br_out, established, accept], tag),
    ]
    if not net.isolated:
        rules.append(_rule("inet", "forward", [br_out, br_in, accept], tag))
    # anything else new, including an isolated guest routing to another via the gateway
    rules.append(_rule("inet", "forward", [br_out, drop], tag))
    if net.ipv6_subnet is not None:
        v6_source = _match(_payload("ip6", "saddr"), _prefix(net.ipv6_subnet))
        rules.append(_rule("inet", "postrouting", [v6_source, out_dev, masquerade], tag))
    return rules


def forward_rules(fwd: PortForward) -> list[Json]:
    """DNAT for one forward, in ``prerouting`` (from elsewhere) and ``output`` (the host)."""
    _check_forward(fwd)
    where = (
        _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local")
        if fwd.host_addr == "0.0.0.0"
        else _match(_payload("ip", "daddr"), fwd.host_addr)
    )
    expr = [
        where,
        _match(_payload(fwd.protocol, "dport"), fwd.host_port),
        {"dnat": {"family": "ip", "addr": fwd.guest_addr, "port": fwd.guest_port}},
    ]
    spec = f"{fwd.protocol},{fwd.host_addr},{fwd.host_port},{fwd.guest_addr},{fwd.guest_port}"
    tag = _comment(vm=fwd.vm, fwd=spec)
    return [_rule("inet", "prerouting", expr, tag), _rule("inet", "output", expr, tag)]


def _limit(rate: int, unit: Unit) -> Json:
    if unit == "bytes":
        burst = max(MIN_BYTE_BURST, rate // 10)
        return {
            "limit": {
                "rate": rate,
                "rate_unit": "bytes",
                "per": "second",
                "burst": burst,
                "burst_unit": "bytes",
                "inv": True,
            }
        }
    burst = max(MIN_PACKET_BURST, rate // 10)
    return {"limit": {"rate": rate, "per": "second", "burst": burst, "inv": True}}


def _limit_chain(tap: str, direction: Direction) -> str:
    return f"{direction}_{tap}"


def limit_commands(limits: TapLimits, state: FirewallState | None = None) -> list[Json]:
    """Make ``limits`` the TAP's limits (both hooks) in one batch; all None removes them.

    Create the TAP first: kernel 6.18 here accepts a chain for a missing device (and keeps
    the chain when the device goes), older kernels bind netdev chains to live devices only.
    """
    _token(limits.vm, "VM id")
    _token(limits.tap, "TAP name")
    state = state or FirewallState()
    # the TAP's ingress is what the guest transmits, its egress what it receives
    sides: list[tuple[Direction, str, int | None, int | None]] = [
        (
            "in",
            "ingress",
            _rate(limits.guest_tx_pps, "guest_tx_pps"),
            _rate(limits.guest_tx_bytes_per_s, "guest_tx_bytes_per_s"),
        ),
        (
            "out",
            "egress",
            _rate(limits.guest_rx_pps, "guest_rx_pps"),
            _rate(limits.guest_rx_bytes_per_s, "guest_rx_bytes_per_s"),
        ),
    ]
    cmds: list[Json] = []
    for direction, hook, pps, bps in sides:
        chain = _limit_chain(limits.tap, direction)
        if pps is None and bps is None:
            if chain in state.limit_chains:
                cmds.append(_delete_chain("netdev", chain))
            continue
        if not any("table" in c.get("add", {}) for c in cmds):
            cmds.append({"add": {"table": {"family": "netdev", "name": TABLE}}})
        base = {"family": "netdev", "table": TABLE, "name": chain}
        hooked = {"type": "filter", "hook": hook, "dev": limits.tap, "prio": LIMIT_PRIORITY}
        cmds.append({"add": {"chain": {**base, **hooked, "policy": "accept"}}})
        cmds.append({"flush": {"chain": base}})
        rates: list[tuple[Unit, int | None]] = [("packets", pps), ("bytes", bps)]
        for unit, rate in rates:
            if rate is not None:
                tag = _comment(vm=limits.vm, tap=limits.tap, dir=direction, unit=unit, rate=rate)
                expr = [_limit(rate, unit), {"counter": None}, {"drop": None}]
                cmds.append(_rule("netdev", chain, expr, tag))
    return cmds


# --- reading the kernel's ruleset ------------------------------------------------------------


def _counted_packets(expr: object) -> int:
    for item in expr if isinstance(expr, list) else []:
        counter = item.get("counter") if isinstance(item, dict) else None
        if isinstance(counter, dict):
            return int(counter.get("packets", 0))
    return 0


def parse_state(listings: Json | Sequence[Json]) -> FirewallState:
    """Read ``nft -j list table ...`` output (one document or several) back into what
    stoker put there. Rules without a stoker comment are ignored."""
    items: list[Json] = []
    for doc in [listings] if isinstance(listings, dict) else listings:
        items.extend(doc.get("nftables", []))
    networks: set[str] = set()
    forwards: set[PortForward] = set()
    rules: list[OwnedRule] = []
    limit_chains: set[str] = set()
    limit_values: dict[tuple[str, str], dict[str, int]] = {}
    dropped: dict[tuple[str, str], int] = {}
    families: set[str] = set()
    for item in items:
        table, chain, rule = item.get("table"), item.get("chain"), item.get("rule")
        if isinstance(table, dict) and table.get("name") == TABLE:
            families.add(str(table.get("family")))
        if isinstance(chain, dict) and (chain.get("table"), chain.get("family")) == (
            TABLE,
            "netdev",
        ):
            limit_chains.add(str(chain["name"]))
        if not isinstance(rule, dict) or rule.get("table") != TABLE:
            continue
        tags = _parse_comment(rule.get("comment"))
        if tags is None:
            continue
        rules.append(OwnedRule(str(rule["family"]), str(rule["chain"]), int(rule["handle"]), tags))
        if "net" in tags:
            networks.add(tags["net"])
        elif "fwd" in tags:
            proto, host, host_port, guest, guest_port = tags["fwd"].split(",")
            protocol: Protocol = "udp" if proto == "udp" else "tcp"
            forwards.add(
                PortForward(tags["vm"], protocol, host, int(host_port), guest, int(guest_port))
            )
        elif "tap" in tags and (tags.get("dir"), tags.get("unit")) in _LIMIT_FIELDS:
            key = (tags["vm"], tags["tap"])
            name = _LIMIT_FIELDS[(tags["dir"], tags["unit"])]
            limit_values.setdefault(key, {})[name] = int(tags["rate"])
            side = (tags["tap"], "guest_tx" if tags["dir"] == "in" else "guest_rx")
            dropped[side] = dropped.get(side, 0) + _counted_packets(rule.get("expr"))
    limits = tuple(
        TapLimits(vm=vm, tap=tap, **values) for (vm, tap), values in sorted(limit_values.items())
    )
    return FirewallState(
        networks=frozenset(networks),
        forwards=tuple(sorted(forwards)),
        limits=limits,
        dropped=dropped,
        inet_exists="inet" in families,
        netdev_exists="netdev" in families,
        rules=tuple(rules),
        limit_chains=frozenset(limit_chains),
    )


# --- change plans ----------------------------------------------------------------------------


def _deletes(state: FirewallState, whose: Callable[[Mapping[str, str]], bool]) -> list[Json]:
    return [_delete_rule(r) for r in state.rules if whose(r.tags)]


def set_network_commands(state: FirewallState, net: NetworkRules) -> list[Json]:
    """Install a network's rules, replacing any it had (a changed isolation mode, say)."""
    return [
        *base_commands(),
        *_deletes(state, lambda t: t.get("net") == net.name),
        *network_rules(net),
    ]


def remove_network_commands(state: FirewallState, name: str) -> list[Json]:
    return _deletes(state, lambda t: t.get("net") == name)


def set_forwards_commands(
    state: FirewallState, vm: str, forwards: Sequence[PortForward]
) -> list[Json]:
    """Make ``forwards`` exactly the VM's port forwards (an empty list removes them)."""
    _token(vm, "VM id")
    for fwd in forwards:
        if fwd.vm != vm:
            raise FirewallError(f"forward {fwd.describe()} belongs to VM {fwd.vm}, not {vm}")
    if len(set(forwards)) != len(forwards):
        raise ForwardConflict(f"VM {vm} lists the same port forward twice")
    check_forward_conflicts(state.forwards, forwards)
    cmds = _deletes(state, lambda t: t.get("vm") == vm and "fwd" in t)
    if forwards:
        cmds = [*base_commands(), *cmds]
        for fwd in forwards:
            cmds += forward_rules(fwd)
    return cmds


def remove_limits_commands(state: FirewallState, tap: str) -> list[Json]:
    chains = (_limit_chain(tap, "in"), _limit_chain(tap, "out"))
    return [_delete_chain("netdev", c) for c in chains if c in state.limit_chains]


def remove_vm_commands(state: FirewallState, vm: str) -> list[Json]:
    """Everything of one VM: its forwards and its TAP limits."""
    cmds = _deletes(state, lambda t: t.get("vm") == vm and "fwd" in t)
    for lim in state.limits_of(vm):
        cmds += remove_limits_commands(state, lim.tap)
    return cmds


def reconcile_commands(
    state: FirewallState, networks: Iterable[str], vms: Iterable[str]
) -> list[Json]:
    """Remove the rules of networks and VMs not in the given sets, and limit chains that
    belong to no listed VM (also ones that lost their rules)."""
    keep_networks, keep_vms = set(networks), set(vms)
    cmds = _deletes(
        state,
        lambda t: (
            ("net" in t and t["net"] not in keep_networks)
            or ("fwd" in t and t.get("vm") not in keep_vms)
        ),
    )
    kept_chains = {
        _limit_chain(lim.tap, d)
        for lim in state.limits
        if lim.vm in keep_vms
        for d in ("in", "out")
    }
    cmds += [_delete_chain("netdev", c) for c in sorted(state.limit_chains - kept_chains)]
    return cmds


def destroy_commands(state: FirewallState) -> list[Json]:
    """Delete both of stoker's tables (uninstall, tests)."""
    return [
        {"delete": {"table": {"family": family, "name": TABLE}}}
        for family, exists in (("inet", state.inet_exists), ("netdev", state.netdev_exists))
        if exists
    ]
