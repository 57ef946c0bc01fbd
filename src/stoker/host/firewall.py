"""stoker's nftables tables in one network namespace: read them, change them atomically.

The rules themselves are built and parsed by pure functions in :mod:`stoker.host.nft_rules`
(the data types are re-exported here); this module runs ``nft -j`` (Debian ``nftables``)
and sets the two sysctls routing needs. Every change reads the current ruleset, plans one
batch and applies it as one nft transaction, all or nothing; callers serialise changes.

Measured here: an ``accept`` in stoker's ``forward`` chain does not override a ``drop`` in
another table's chain on the same hook (nftables evaluates every base chain and a drop
anywhere is final). A host whose own forward policy is drop (Docker sets one) still blocks
the guests' traffic through the host; :meth:`Firewall.forward_blockers` names such chains
so the caller can tell the operator what to allow. stoker never edits them.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable, Sequence
from typing import Any

from stoker.host.netns import NetnsError, netns_argv, write_sysctl
from stoker.host.nft_rules import (
    TABLE,
    FirewallError,
    FirewallState,
    ForwardConflict,
    Json,
    NetworkRules,
    PortForward,
    TapLimits,
    destroy_commands,
    limit_commands,
    parse_state,
    reconcile_commands,
    remove_limits_commands,
    remove_network_commands,
    remove_vm_commands,
    set_forwards_commands,
    set_network_commands,
)

__all__ = [
    "Firewall",
    "FirewallError",
    "FirewallState",
    "ForwardConflict",
    "NetworkRules",
    "PortForward",
    "TapLimits",
    "enable_forwarding",
    "enable_localhost_forwards",
    "forward_blockers",
]


class Firewall:
    """stoker's tables in one network namespace (None: the one the agent runs in)."""

    def __init__(self, netns: str | None = None, nft: str = "nft") -> None:
        self.netns = netns
        self.nft = nft

    def _run(self, args: list[str], stdin: str | None = None) -> str:
        try:
            argv = [*netns_argv(self.netns), self.nft, *args]
        except NetnsError as exc:
            raise FirewallError(str(exc)) from exc
        try:
            proc = subprocess.run(
                argv, input=stdin, capture_output=True, text=True, timeout=30, check=False
            )
        except FileNotFoundError as exc:
            raise FirewallError(
                f"{self.nft} not found: install nftables (apt-get install nftables)"
            ) from exc
        if proc.returncode != 0:
            raise FirewallError(f"nft {' '.join(args)} failed: {proc.stderr.strip()[-1500:]}")
        return proc.stdout

    def apply(self, commands: Sequence[Json]) -> None:
        """Run ``commands`` as one atomic nft transaction (nothing when empty)."""
        if commands:
            self._run(["-j", "-f", "-"], json.dumps({"nftables": list(commands)}))

    def _list_table(self, family: str) -> Json | None:
        try:
            doc: Json = json.loads(self._run(["-j", "list", "table", family, TABLE]))
        except FirewallError as exc:
            if "No such file or directory" in str(exc):
                return None
            raise
        return doc

    def state(self) -> FirewallState:
        """What stoker's tables hold now (networks, forwards, limits, drop counts)."""
        docs = [d for d in (self._list_table("inet"), self._list_table("netdev")) if d]
        return parse_state(docs)

    def set_network(self, net: NetworkRules) -> None:
        """Install or replace a network's NAT, forwarding and guard rules."""
        self.apply(set_network_commands(self.state(), net))

    def remove_network(self, name: str) -> None:
        self.apply(remove_network_commands(self.state(), name))

    def set_forwards(self, vm: str, forwards: Sequence[PortForward]) -> None:
        """Make ``forwards`` the VM's port forwards; [] removes them. Conflicts raise
        :class:`ForwardConflict` and change nothing."""
        self.apply(set_forwards_commands(self.state(), vm, forwards))

    def set_limits(self, limits: TapLimits) -> None:
        """Make ``limits`` the TAP's rate limits (live); all None removes them."""
        self.apply(limit_commands(limits, self.state()))

    def clear_limits(self, tap: str) -> None:
        self.apply(remove_limits_commands(self.state(), tap))

    def remove_vm(self, vm: str) -> None:
        """The VM's forwards and TAP limits, gone in one transaction."""
        self.apply(remove_vm_commands(self.state(), vm))

    def reconcile(self, networks: Iterable[str], vms: Iterable[str]) -> FirewallState:
        """Drop what belongs to no listed network or VM; returns what is left."""
        self.apply(reconcile_commands(self.state(), networks, vms))
        return self.state()

    def destroy(self) -> None:
        """Delete both of stoker's tables (uninstall, tests)."""
        self.apply(destroy_commands(self.state()))

    def forward_blockers(self) -> list[str]:
        """Other tables' forward chains with policy drop (see the module docstring)."""
        listing: dict[str, Any] = json.loads(self._run(["-j", "list", "chains"]))
        return forward_blockers(listing)


def forward_blockers(chains_listing: Json) -> list[str]:
    """Forward-hook chains of other tables whose policy is drop, as ``table FAMILY NAME
    chain NAME``, from ``nft -j list chains``."""
    found = []
    for item in chains_listing.get("nftables", []):
        chain = item.get("chain")
        if not isinstance(chain, dict) or chain.get("table") == TABLE:
            continue
        if chain.get("hook") == "forward" and chain.get("policy") == "drop":
            found.append(f"table {chain['family']} {chain['table']} chain {chain['name']}")
    return found


def enable_forwarding(netns: str | None = None, ipv6: bool = False) -> None:
    """``net.ipv4.ip_forward=1`` (and IPv6 forwarding): without it nothing is routed."""
    try:
        write_sysctl("net.ipv4.ip_forward", "1", netns)
        if ipv6:
            write_sysctl("net.ipv6.conf.all.forwarding", "1", netns)
    except NetnsError as exc:
        raise FirewallError(str(exc)) from exc


def enable_localhost_forwards(bridge: str, netns: str | None = None) -> None:
    """``route_localnet=1`` on the bridge, so forwards on 127.0.0.1 work from the host
    (the ``guard`` chain keeps guests away from the host's loopback)."""
    try:
        write_sysctl(f"net/ipv4/conf/{bridge}/route_localnet", "1", netns)
    except NetnsError as exc:
        raise FirewallError(str(exc)) from exc
