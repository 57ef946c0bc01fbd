"""The IPv4 subnets this host is already connected to, so a new managed network never
shadows one of them (a bridge on 192.168.1.0/24 would cut the host off its own LAN).

pyroute2 has no type information: this module returns plain typed values only.
"""

from __future__ import annotations

import socket
from ipaddress import IPv4Interface

from pyroute2 import IPRoute

__all__ = ["connected_subnets"]


def connected_subnets() -> list[tuple[str, str]]:
    """``[("eth0", "192.168.1.0/24"), ...]``: the interface and subnet of every global IPv4
    address in the namespace the agent runs in (loopback and link-local ones left out)."""
    found: list[tuple[str, str]] = []
    with IPRoute() as ipr:
        names = {int(link["index"]): str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()}
        for msg in ipr.get_addr(family=socket.AF_INET):
            if int(msg["scope"]) != 0:  # only "universe": not host, not link
                continue
            iface = IPv4Interface(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}")
            name = names.get(int(msg["index"]), f"#{msg['index']}")
            found.append((name, str(iface.network)))
    return found
