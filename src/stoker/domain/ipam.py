"""Address management for stoker's managed networks: pure rules, no I/O.

Which subnets are allowed: only RFC 1918 private ranges (10/8, 172.16/12, 192.168/16).
100.64.0.0/10 (RFC 6598 shared address space) is refused on purpose: it belongs to
carrier-grade NAT and to overlay VPNs (Tailscale hands out 100.64/10 addresses), so a bridge
there silently shadows routes the host already depends on; and public space would hijack
real destinations. Prefixes run from /16 (65 533 guests is plenty for one host) to /29 (five
guests: network, gateway and broadcast take three of the eight addresses).

Layout of a network: the network address, the gateway (first host, on the bridge), then the
pool (every other host address up to, not including, the broadcast address). Guests get
their addresses from the pool by :func:`allocate`, which hands out the next address after the
last one it ever handed out and wraps to the start only at the end of the pool, so an address
released by a deleted VM is not given to a new VM at once (stale ARP caches, DNS entries and
firewall rules elsewhere keep pointing at it for a while).

Interface names are derived from ids, at most 15 bytes, with the prefix ``stk`` so start-up
reconciliation can recognise stoker's own links and leave everything else alone. MACs are
locally administered unicast addresses derived from the VM id, so a VM keeps its MAC (and its
DHCP lease) across restarts.

IPv6 (optional): a ULA /64 per network (RFC 4193, fd00::/8 with a 40-bit global id derived
from the network id), gateway ``::1`` on the bridge; a guest configures itself by SLAAC from
router advertisements, so its address is the EUI-64 of its MAC (:func:`slaac_address`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import (
    AddressValueError,
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    NetmaskValueError,
)

__all__ = [
    "ALLOWED_RANGES",
    "BRIDGE_PREFIX",
    "IFNAME_PREFIX",
    "MAX_PREFIX",
    "MIN_PREFIX",
    "TAP_PREFIX",
    "AddressPlan",
    "InvalidAddress",
    "InvalidSubnet",
    "IpamError",
    "PoolFull",
    "SubnetOverlap",
    "allocate",
    "bridge_mac",
    "bridge_name",
    "check_address",
    "gateway",
    "ifname_kind",
    "is_stoker_ifname",
    "mac_for_vm",
    "plan",
    "slaac_address",
    "tap_name",
    "ula_gateway",
    "ula_subnet",
    "validate_subnet",
]

ALLOWED_RANGES: tuple[IPv4Network, ...] = (
    IPv4Network("10.0.0.0/8"),
    IPv4Network("172.16.0.0/12"),
    IPv4Network("192.168.0.0/16"),
)
MIN_PREFIX = 16
MAX_PREFIX = 29

IFNAME_PREFIX = "stk"
TAP_PREFIX = IFNAME_PREFIX + "t"
BRIDGE_PREFIX = IFNAME_PREFIX + "b"
IFNAMSIZ = 15  # bytes, without the terminating NUL
_ID_HASH_CHARS = IFNAMSIZ - len(TAP_PREFIX)  # 11 hex digits = 44 bits


class IpamError(ValueError):
    """A request the address manager refuses; the message says what to change."""


class InvalidSubnet(IpamError):
    """The subnet is malformed, not private, or of an unusable size."""


class SubnetOverlap(IpamError):
    """The subnet overlaps a network that exists already."""


class InvalidAddress(IpamError):
    """An address is malformed or outside the network's pool."""


class PoolFull(IpamError):
    """Every address of the pool is taken."""


@dataclass(frozen=True)
class AddressPlan:
    """Where everything lives in one network's subnet."""

    subnet: IPv4Network
    gateway: IPv4Address
    pool_first: IPv4Address
    pool_last: IPv4Address

    @property
    def prefixlen(self) -> int:
        return self.subnet.prefixlen

    @property
    def netmask(self) -> IPv4Address:
        return self.subnet.netmask

    @property
    def broadcast(self) -> IPv4Address:
        return self.subnet.broadcast_address

    @property
    def pool_size(self) -> int:
        return int(self.pool_last) - int(self.pool_first) + 1

    @property
    def gateway_cidr(self) -> str:
        """The gateway with the prefix, as it goes on the bridge: ``10.88.0.1/24``."""
        return f"{self.gateway}/{self.prefixlen}"

    def in_pool(self, address: IPv4Address) -> bool:
        return self.pool_first <= address <= self.pool_last


def _parse_network(text: str | IPv4Network, what: str = "subnet") -> IPv4Network:
    if isinstance(text, IPv4Network):
        return text
    example = "for example 10.88.0.0/24"
    if "/" not in str(text):
        raise InvalidSubnet(f"{what} {text!r} has no prefix length: write it as CIDR, {example}")
    try:
        loose = IPv4Network(text, strict=False)
    except (AddressValueError, NetmaskValueError, ValueError) as exc:
        raise InvalidSubnet(
            f"{what} {text!r} is not an IPv4 network in CIDR form, {example}"
        ) from exc
    if str(loose.network_address) != str(text).split("/", 1)[0]:
        raise InvalidSubnet(
            f"{what} {text!r} has host bits set: did you mean {loose}? "
            "(give the network address, not an address inside it)"
        )
    return loose


def validate_subnet(
    text: str | IPv4Network, existing: Mapping[str, str | IPv4Network] | None = None
) -> IPv4Network:
    """Parse and check a subnet for a new network.

    ``existing`` maps a description (``"network 'default'"``, ``"host interface eth0"``) to
    a subnet already in use; the service passes every stoker network and the host's own
    connected subnets, so a new bridge never shadows a route the host has.
    """
    subnet = _parse_network(text)
    if not any(subnet.subnet_of(allowed) for allowed in ALLOWED_RANGES):
        ranges = ", ".join(str(r) for r in ALLOWED_RANGES)
        raise InvalidSubnet(
            f"subnet {subnet} is not private: use a subnet inside {ranges} (RFC 1918); "
            "100.64.0.0/10 and public ranges are refused so a VM network never shadows "
            "real destinations"
        )
    if subnet.prefixlen < MIN_PREFIX:
        raise InvalidSubnet(
            f"subnet {subnet} is too large: use a prefix between /{MIN_PREFIX} and /{MAX_PREFIX}"
        )
    if subnet.prefixlen > MAX_PREFIX:
        raise InvalidSubnet(
            f"subnet {subnet} is too small: use a prefix between /{MIN_PREFIX} and "
            f"/{MAX_PREFIX} (a /{MAX_PREFIX} holds 5 guests)"
        )
    for name, other_text in (existing or {}).items():
        other = _parse_network(other_text, what=name)
        if subnet.overlaps(other):
            raise SubnetOverlap(
                f"subnet {subnet} overlaps {name} ({other}): choose a subnet outside it"
            )
    return subnet


def plan(subnet: str | IPv4Network) -> AddressPlan:
    """The gateway and pool of a (valid) subnet."""
    net = _parse_network(subnet)
    if net.num_addresses < 8:
        raise InvalidSubnet(f"subnet {net} is too small: use a prefix of /{MAX_PREFIX} or shorter")
    base = int(net.network_address)
    return AddressPlan(
        subnet=net,
        gateway=IPv4Address(base + 1),
        pool_first=IPv4Address(base + 2),
        pool_last=IPv4Address(int(net.broadcast_address) - 1),
    )


def gateway(subnet: str | IPv4Network) -> IPv4Address:
    """The first host address, which the bridge carries."""
    return plan(subnet).gateway


def _parse_address(text: str, what: str) -> IPv4Address:
    try:
        return IPv4Address(text)
    except AddressValueError as exc:
        raise InvalidAddress(f"{what} {text!r} is not an IPv4 address") from exc


def check_address(subnet: str | IPv4Network, address: str, taken: Iterable[str] = ()) -> str:
    """Accept an operator-chosen static address: in the pool and not taken. Returns it."""
    layout = plan(subnet)
    ip = _parse_address(address, "address")
    if not layout.in_pool(ip):
        raise InvalidAddress(
            f"address {ip} is not usable in {layout.subnet}: pick one from "
            f"{layout.pool_first} to {layout.pool_last} (the network address, the gateway "
            f"{layout.gateway} and the broadcast address are reserved)"
        )
    if str(ip) in set(taken):
        raise InvalidAddress(f"address {ip} is already taken in {layout.subnet}: pick another")
    return str(ip)


def allocate(subnet: str | IPv4Network, taken: set[str], cursor: str | None) -> tuple[str, str]:
    """The next free pool address after ``cursor`` (the last one ever handed out).

    Returns ``(address, new_cursor)``; store ``new_cursor`` and pass it back next time. The
    search runs to the end of the pool and wraps to its start only then, so released
    addresses rest as long as possible. A cursor outside the pool (the subnet changed, or
    none yet) starts at the beginning. Raises :class:`PoolFull` when nothing is free.
    """
    layout = plan(subnet)
    first, last = int(layout.pool_first), int(layout.pool_last)
    used = {int(_parse_address(t, "taken address")) for t in taken}
    start = first
    if cursor is not None:
        at = int(_parse_address(cursor, "cursor"))
        if first <= at <= last:
            start = at + 1 if at < last else first
    for candidate in (*range(start, last + 1), *range(first, start)):
        if candidate not in used:
            address = str(IPv4Address(candidate))
            return address, address
    raise PoolFull(
        f"network {layout.subnet} has no free address: all {layout.pool_size} are taken; "
        "delete a VM on it or create a network with a larger subnet"
    )


def _digest(*parts: str) -> bytes:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\x00")
    return h.digest()


def mac_for_vm(vm_id: str, network_id: str = "") -> str:
    """A stable MAC for a VM's NIC: locally administered (bit 1) unicast (bit 0 clear).

    46 bits come from a hash of the ids, so collisions within one network are negligible.
    """
    raw = bytearray(_digest("stoker-mac", vm_id, network_id)[:6])
    raw[0] = (raw[0] & 0b1111_1100) | 0b0000_0010
    return ":".join(f"{b:02x}" for b in raw)


def bridge_mac(network_id: str) -> str:
    """A stable MAC for a network's bridge, so the gateway's MAC never changes."""
    return mac_for_vm("", "bridge:" + network_id)


def _ifname(prefix: str, key: str) -> str:
    return prefix + _digest("stoker-ifname", prefix, key).hex()[: IFNAMSIZ - len(prefix)]


def tap_name(vm_id: str) -> str:
    """The TAP of a VM's NIC: ``stkt`` + 11 hex digits of a hash of the VM id (15 bytes)."""
    return _ifname(TAP_PREFIX, vm_id)


def bridge_name(network_id: str) -> str:
    """The bridge of a network: ``stkb`` + 11 hex digits of a hash of the network id."""
    return _ifname(BRIDGE_PREFIX, network_id)


def is_stoker_ifname(name: str) -> bool:
    """True for a link stoker created (reconciliation may remove it); false for all others."""
    return ifname_kind(name) is not None


def ifname_kind(name: str) -> str | None:
    """``"tap"``, ``"bridge"`` or None, from the name alone."""
    hexpart = name[len(TAP_PREFIX) :]
    if len(name) != IFNAMSIZ or any(c not in "0123456789abcdef" for c in hexpart):
        return None
    if name.startswith(TAP_PREFIX):
        return "tap"
    if name.startswith(BRIDGE_PREFIX):
        return "bridge"
    return None


def ula_subnet(network_id: str, host_key: str = "") -> IPv6Network:
    """A unique-local /64 for a network (RFC 4193: fd + 40-bit global id + subnet id 0).

    ``host_key`` (for example the host's machine id) keeps two hosts' ``default`` networks
    apart should their guests ever meet.
    """
    global_id = _digest("stoker-ula", host_key, network_id)[:5]
    prefix = bytes([0xFD]) + global_id + bytes(10)
    return IPv6Network((IPv6Address(prefix), 64))


def ula_gateway(subnet6: IPv6Network) -> IPv6Address:
    """The router address on the bridge (``::1`` of the /64)."""
    return subnet6.network_address + 1


def slaac_address(subnet6: IPv6Network, mac: str) -> IPv6Address:
    """The address a guest with ``mac`` gives itself by SLAAC (modified EUI-64) in a /64."""
    if subnet6.prefixlen != 64:
        raise InvalidSubnet(f"SLAAC needs a /64, not {subnet6}")
    octets = [int(part, 16) for part in mac.split(":")]
    if len(octets) != 6:
        raise InvalidAddress(f"MAC {mac!r} is not six colon-separated bytes")
    eui = bytes([octets[0] ^ 0x02, *octets[1:3], 0xFF, 0xFE, *octets[3:]])
    return IPv6Address(int(subnet6.network_address) | int.from_bytes(eui, "big"))
