"""Which of stoker's host objects belong to nothing any more: pure choices over what the host
shows, so the rules are unit-tested without a kernel.

stoker recognises its own links by name (``stkb…`` bridges, ``stkt…`` TAPs, see
:func:`stoker.domain.ipam.ifname_kind`) and by the alias it gives them, which names the
agent (its state directory): another agent's links in the same namespace are left alone.
Its own dnsmasq processes it knows by the pid file on their command line, which lies under
its state directory. Anything else on the host is never touched. (nftables rules carry only
the network's name: one agent per network namespace is the supported setup.)
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from stoker.domain import ipam
from stoker.host.bridge import LinkInfo
from stoker.host.dnsmasq import DnsmasqProcess

__all__ = ["link_alias", "stray_dnsmasq", "stray_links", "stray_state_dirs"]


def link_alias(owner: str, what: str) -> str:
    """The alias of a link this agent made: ``stoker <owner> <what>`` (``network default``,
    ``vm 1a2b...``); ``owner`` tells two agents' links apart."""
    return f"stoker {owner} {what}"


def stray_links(
    links: Iterable[LinkInfo], owner: str, keep_bridges: set[str], keep_taps: set[str]
) -> list[str]:
    """This agent's TAPs and bridges that no known network or active VM owns: TAPs first (a
    bridge goes after its ports), each group in name order."""
    taps, bridges = [], []
    for link in links:
        if not (link.alias or "").startswith(link_alias(owner, "")):
            continue
        kind = ipam.ifname_kind(link.name)
        if kind == "tap" and link.name not in keep_taps:
            taps.append(link.name)
        elif kind == "bridge" and link.name not in keep_bridges:
            bridges.append(link.name)
    return sorted(taps) + sorted(bridges)


def stray_dnsmasq(
    running: Iterable[DnsmasqProcess], state_root: Path, keep_pids: set[int]
) -> list[DnsmasqProcess]:
    """This agent's dnsmasq processes (pid file under ``state_root``) that serve no known
    network: a network deleted while the agent was down, or a duplicate."""
    return [
        process
        for process in running
        if process.pid not in keep_pids and process.pid_file.is_relative_to(state_root)
    ]


def stray_state_dirs(state_root: Path, keep_ids: set[str]) -> list[Path]:
    """State directories of networks that no longer exist."""
    if not state_root.is_dir():
        return []
    return sorted(p for p in state_root.iterdir() if p.is_dir() and p.name not in keep_ids)
