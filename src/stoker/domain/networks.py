"""Managed networks as records: what an operator asks for, what the store keeps, and the pure
checks that need nothing but those records.

A network is a bridge with a gateway address, outbound NAT, a DHCP server and an isolation
mode; each VM on it holds one address lease from the network's pool until the VM is deleted
(see :mod:`stoker.domain.ipam` for the address rules). Nothing here touches the host.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from pydantic import Field, field_validator
from pydantic.config import JsonDict

from stoker.domain.spec import NAME_PATTERN, PortForward, Strict

__all__ = [
    "IFNAME_MAX",
    "IFNAME_PATTERN",
    "DnsmasqRecord",
    "ForwardOwner",
    "Isolation",
    "Lease",
    "NetworkRecord",
    "NetworkSpec",
    "forward_conflicts",
]

IFNAME_MAX = 15  # bytes: IFNAMSIZ without its NUL
IFNAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
_IFNAME_RE = re.compile(IFNAME_PATTERN)


class Isolation(StrEnum):
    #: guests reach the gateway and the outside, never each other (bridge port isolation)
    ISOLATED = "isolated"
    #: guests on the network reach each other too
    OPEN = "open"


def _ifname(value: str | None, what: str) -> str | None:
    """An interface name the kernel accepts, with a message that says what to change (the
    schema declares the same limits, so a client sees them before it sends)."""
    if value is None:
        return None
    size = len(value.encode())
    if size > IFNAME_MAX:
        raise ValueError(
            f"{what} {value!r} is {size} characters: Linux interface names are at most "
            f"{IFNAME_MAX}; choose a shorter name"
        )
    if not _IFNAME_RE.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} is not a valid interface name: use A-Z a-z 0-9 _ . - and start "
            "with a letter or digit"
        )
    return value


_IFNAME_SCHEMA: JsonDict = {"maxLength": IFNAME_MAX, "minLength": 1, "pattern": IFNAME_PATTERN}


class NetworkSpec(Strict):
    """A request for a new managed network."""

    name: str = Field(
        pattern=NAME_PATTERN,
        description="lower-case letters, digits and '-', at most 63 characters",
        examples=["backend"],
    )
    subnet: str = Field(
        max_length=18,
        description="a private IPv4 subnet in CIDR form (RFC 1918), /16 to /29",
        examples=["10.90.0.0/24"],
    )
    isolation: Isolation = Field(
        default=Isolation.ISOLATED,
        description="isolated: guests never reach each other; open: they do",
    )
    ipv6: bool = Field(
        default=False, description="also a unique-local IPv6 /64 (SLAAC), masqueraded out"
    )
    bridge: str | None = Field(
        default=None,
        description="the bridge's interface name (default: derived from the network id)",
        json_schema_extra=_IFNAME_SCHEMA,
    )
    uplink: str | None = Field(
        default=None,
        description="masquerade only out of this host interface (default: any but the bridge)",
        json_schema_extra=_IFNAME_SCHEMA,
    )

    @field_validator("bridge")
    @classmethod
    def _bridge(cls, v: str | None) -> str | None:
        return _ifname(v, "bridge name")

    @field_validator("uplink")
    @classmethod
    def _uplink(cls, v: str | None) -> str | None:
        return _ifname(v, "uplink interface")


@dataclass(frozen=True)
class NetworkRecord:
    """One network as the store keeps it."""

    id: str
    name: str
    subnet: str
    gateway: str
    isolation: Isolation
    bridge: str
    created_at: datetime
    #: "api" (an operator made it) or "config" (the default network, made on first use)
    managed_by: str
    ipv6_subnet: str | None = None
    uplink: str | None = None

    @property
    def isolated(self) -> bool:
        return self.isolation == Isolation.ISOLATED


@dataclass(frozen=True)
class Lease:
    """A VM's address on a network: held from the VM's creation until its deletion."""

    network_id: str
    vm_id: str
    address: str
    mac: str
    created_at: datetime


@dataclass(frozen=True)
class DnsmasqRecord:
    """The network's DHCP server as last started: pid plus start time identify it."""

    network_id: str
    pid: int
    start_time: int


@dataclass(frozen=True)
class ForwardOwner:
    """A port forward of a VM on a managed network, for conflict checks."""

    vm_name: str
    forward: PortForward


def forward_conflicts(
    wanted: Iterable[PortForward], existing: Iterable[ForwardOwner]
) -> list[tuple[PortForward, ForwardOwner]]:
    """The wanted forwards that take a host port another VM's forward already uses.

    Same protocol and port clash when the host addresses are equal or either is 0.0.0.0
    (every local address, 127.0.0.1 included).
    """
    clashes = []
    others = list(existing)
    for fwd in wanted:
        for other in others:
            theirs = other.forward
            if (theirs.protocol, theirs.host_port) != (fwd.protocol, fwd.host_port):
                continue
            if "0.0.0.0" in (theirs.host_addr, fwd.host_addr) or theirs.host_addr == fwd.host_addr:
                clashes.append((fwd, other))
    return clashes
