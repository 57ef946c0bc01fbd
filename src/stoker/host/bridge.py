"""Bridges and TAP devices of stoker's managed networks, through netlink (pyroute2).

pyroute2 has no type information, so it is confined to this module: every function here
takes and returns plain typed values. All operations are idempotent, so the agent can re-run
its set-up after a restart and reconciliation can delete blindly: creating what exists checks
it and fixes what differs, deleting what is gone does nothing. A same-named device of another
kind is an error, never reused.

A TAP is created persistent and owned by the VM's uid/gid, so an unprivileged VMM can attach
to it by name, or the agent hands the VMM a descriptor from :func:`open_tap_fd`
(``-netdev tap,fd=N`` for QEMU). Port isolation (``isolated``) keeps guests on one bridge
from reaching each other at layer 2 while all of them still reach the gateway: the bridge's
own interface is not an isolated port.

Every function takes ``netns`` (None: the namespace the agent runs in), so the tests can run
the same code inside namespaces they make. The calls block (pyroute2's synchronous API drives
its own event loop): call them from a worker thread (``asyncio.to_thread``), never from a
coroutine.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv6Interface, ip_interface
from typing import Any

# pyroute2 ships neither stubs nor py.typed (pyproject lets mypy import it as Any): only this
# module touches it, and every function here returns typed values.
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from stoker.host.netns import NetnsError, call_in_netns, netns_argv

__all__ = [
    "LinkInfo",
    "NetDeviceError",
    "TapCounters",
    "attach_tap",
    "delete_link",
    "ensure_bridge",
    "ensure_tap",
    "link_info",
    "list_links",
    "open_tap_fd",
    "read_counters",
    "set_isolated",
]

_IFNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
_TUNSETIFF = 0x400454CA
_TUN_TYPE_TAP = 2
_IFA_F_NODAD = 0x02


class NetDeviceError(RuntimeError):
    """A netlink operation failed; the message names the device, the namespace and why."""


@dataclass(frozen=True)
class LinkInfo:
    """One network device as reconciliation needs to see it."""

    name: str
    index: int
    kind: str | None  # "bridge", "tap", "tun", "veth", ... None for plain devices
    master: str | None  # the bridge it is attached to
    up: bool
    alias: str | None
    owner_uid: int | None = None  # TAPs only
    owner_gid: int | None = None
    isolated: bool | None = None  # bridge ports only


@dataclass(frozen=True)
class TapCounters:
    """Kernel counters of a TAP. The TAP receives what the guest sends, and vice versa."""

    rx_bytes: int
    rx_packets: int
    tx_bytes: int
    tx_packets: int
    rx_dropped: int
    tx_dropped: int

    @property
    def guest_tx_bytes(self) -> int:
        return self.rx_bytes

    @property
    def guest_rx_bytes(self) -> int:
        return self.tx_bytes


def _where(netns: str | None) -> str:
    return f"netns {netns}" if netns else "the host namespace"


def _check_name(name: str) -> str:
    if not _IFNAME_RE.fullmatch(name):
        raise NetDeviceError(
            f"invalid interface name {name!r}: use 1 to 15 of A-Z a-z 0-9 _ . - "
            "(not starting with one of _ . -)"
        )
    return name


@contextmanager
def _ipr(netns: str | None) -> Iterator[Any]:
    """An IPRoute socket in ``netns``; a missing namespace is an error, never created."""
    try:
        netns_argv(netns)  # checks that it exists
    except NetnsError as exc:
        raise NetDeviceError(str(exc)) from exc
    ipr = IPRoute(netns=netns) if netns else IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _call(what: str, netns: str | None, fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except NetlinkError as exc:
        raise NetDeviceError(f"cannot {what} in {_where(netns)}: {exc.args[-1]}") from exc
    except OSError as exc:  # the tuntap ioctls
        raise NetDeviceError(f"cannot {what} in {_where(netns)}: {exc.strerror}") from exc


def _index(ipr: Any, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def _info(ipr: Any, msg: Any) -> LinkInfo:
    linkinfo = msg.get_attr("IFLA_LINKINFO")
    kind: str | None = None
    uid = gid = None
    isolated: bool | None = None
    if linkinfo is not None:
        kind = linkinfo.get_attr("IFLA_INFO_KIND")
        data = linkinfo.get_attr("IFLA_INFO_DATA")
        if kind == "tun" and data is not None:
            if data.get_attr("IFLA_TUN_TYPE") == _TUN_TYPE_TAP:
                kind = "tap"
            uid, gid = data.get_attr("IFLA_TUN_OWNER"), data.get_attr("IFLA_TUN_GROUP")
        slave = linkinfo.get_attr("IFLA_INFO_SLAVE_DATA")
        if linkinfo.get_attr("IFLA_INFO_SLAVE_KIND") == "bridge" and slave is not None:
            isolated = bool(slave.get_attr("IFLA_BRPORT_ISOLATED"))
    master_index = msg.get_attr("IFLA_MASTER")
    master = None
    if master_index:
        links = ipr.get_links(master_index)
        master = str(links[0].get_attr("IFLA_IFNAME")) if links else None
    alias = msg.get_attr("IFLA_IFALIAS")
    return LinkInfo(
        name=str(msg.get_attr("IFLA_IFNAME")),
        index=int(msg["index"]),
        kind=None if kind is None else str(kind),
        master=master,
        up=bool(int(msg["flags"]) & 1),
        alias=None if alias is None else str(alias),
        owner_uid=None if uid is None or uid == 0xFFFFFFFF else int(uid),
        owner_gid=None if gid is None or gid == 0xFFFFFFFF else int(gid),
        isolated=isolated,
    )


def _link(ipr: Any, index: int) -> LinkInfo:
    return _info(ipr, ipr.get_links(index)[0])


def _set_addresses(
    ipr: Any, index: int, name: str, wanted: list[IPv4Interface | IPv6Interface], netns: str | None
) -> None:
    """Make the bridge's global addresses exactly ``wanted`` (link-local ones are left)."""
    have = {}
    for msg in ipr.get_addr(index=index):
        if int(msg["scope"]) == 0:  # universe: not link-local, not host
            iface = ip_interface(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}")
            have[iface] = msg
    for iface in wanted:
        if iface not in have:
            flags = _IFA_F_NODAD if iface.version == 6 else 0  # a router does no DAD delay
            _call(
                f"add {iface} to {name}",
                netns,
                ipr.addr,
                "add",
                index=index,
                address=str(iface.ip),
                prefixlen=iface.network.prefixlen,
                flags=flags,
            )
    for iface in set(have) - set(wanted):
        _call(
            f"remove {iface} from {name}",
            netns,
            ipr.addr,
            "del",
            index=index,
            address=str(iface.ip),
            prefixlen=iface.network.prefixlen,
        )


def ensure_bridge(
    name: str,
    gateway_cidr: str,
    *,
    ipv6_cidr: str | None = None,
    mac: str | None = None,
    alias: str | None = None,
    netns: str | None = None,
) -> int:
    """Create (or fix) bridge ``name`` carrying ``gateway_cidr`` (``10.88.0.1/24``), up.

    STP is off and the forward delay 0, so a new port forwards at once. ``mac`` pins the
    bridge's address: otherwise it takes the lowest MAC among its ports and changes as TAPs
    come and go, which breaks the guests' ARP entry for the gateway. Returns the ifindex.
    """
    _check_name(name)
    wanted: list[IPv4Interface | IPv6Interface] = [IPv4Interface(gateway_cidr)]
    if ipv6_cidr is not None:
        wanted.append(IPv6Interface(ipv6_cidr))
    with _ipr(netns) as ipr:
        index = _index(ipr, name)
        if index is None:
            extra: dict[str, Any] = {"address": mac} if mac else {}
            _call(
                f"create bridge {name}",
                netns,
                ipr.link,
                "add",
                ifname=name,
                kind="bridge",
                br_stp_state=0,
                br_forward_delay=0,
                **extra,
            )
            index = _index(ipr, name)
            if index is None:
                raise NetDeviceError(
                    f"bridge {name} vanished right after creation in {_where(netns)}"
                )
        else:
            kind = _link(ipr, index).kind
            if kind != "bridge":
                raise NetDeviceError(
                    f"{name} exists in {_where(netns)} as {kind or 'a device'}, not a bridge: "
                    "remove it or choose another network"
                )
            settings: dict[str, Any] = {"br_stp_state": 0, "br_forward_delay": 0}
            if mac:
                settings["address"] = mac
            _call(
                f"configure bridge {name}",
                netns,
                ipr.link,
                "set",
                index=index,
                kind="bridge",
                **settings,
            )
        _set_addresses(ipr, index, name, wanted, netns)
        attrs: dict[str, Any] = {"state": "up"}
        if alias is not None:
            attrs["ifalias"] = alias
        _call(f"bring up {name}", netns, ipr.link, "set", index=index, **attrs)
        return index


def ensure_tap(
    name: str,
    *,
    uid: int | None = None,
    gid: int | None = None,
    bridge: str | None = None,
    isolated: bool = True,
    alias: str | None = None,
    netns: str | None = None,
) -> int:
    """Create (or check) a persistent TAP owned by ``uid``/``gid``, up, on ``bridge``.

    IFF_VNET_HDR and IFF_NO_PI are set, as QEMU and Firecracker open it. An existing TAP
    with another owner is an error (it may be in use by a running VMM, so it is never
    re-created behind its back). Returns the ifindex.
    """
    _check_name(name)
    with _ipr(netns) as ipr:
        index = _index(ipr, name)
        if index is None:
            owner: dict[str, Any] = {}
            if uid is not None:
                owner["uid"] = uid
            if gid is not None:
                owner["gid"] = gid
            _call(
                f"create TAP {name}",
                netns,
                ipr.link,
                "add",
                ifname=name,
                kind="tuntap",
                mode="tap",
                ifr={"no_pi": True, "vnet_hdr": True},
                **owner,
            )
            index = _index(ipr, name)
            if index is None:
                raise NetDeviceError(f"TAP {name} vanished right after creation in {_where(netns)}")
        else:
            info = _link(ipr, index)
            if info.kind != "tap":
                raise NetDeviceError(
                    f"{name} exists in {_where(netns)} as {info.kind or 'a device'}, not a TAP: "
                    "remove it first"
                )
            if (uid is not None and info.owner_uid != uid) or (
                gid is not None and info.owner_gid != gid
            ):
                raise NetDeviceError(
                    f"TAP {name} in {_where(netns)} belongs to uid {info.owner_uid} gid "
                    f"{info.owner_gid}, not uid {uid} gid {gid}: stop the VM using it and "
                    "delete the TAP"
                )
        if alias is not None:
            _call(f"set alias of {name}", netns, ipr.link, "set", index=index, ifalias=alias)
    if bridge is not None:
        attach_tap(name, bridge, isolated=isolated, netns=netns)
    else:
        with _ipr(netns) as ipr:
            _call(f"bring up {name}", netns, ipr.link, "set", index=index, state="up")
    return index


def attach_tap(tap: str, bridge: str, *, isolated: bool, netns: str | None = None) -> None:
    """Make ``tap`` a port of ``bridge`` (isolated or not) and bring it up."""
    _check_name(tap)
    _check_name(bridge)
    with _ipr(netns) as ipr:
        tap_index = _index(ipr, tap)
        bridge_index = _index(ipr, bridge)
        if tap_index is None:
            raise NetDeviceError(f"no TAP {tap} in {_where(netns)}: create it first")
        if bridge_index is None:
            raise NetDeviceError(f"no bridge {bridge} in {_where(netns)}: create the network first")
        _call(
            f"attach {tap} to {bridge}",
            netns,
            ipr.link,
            "set",
            index=tap_index,
            master=bridge_index,
            state="up",
        )
        _call(
            f"set isolation on {tap}",
            netns,
            ipr.brport,
            "set",
            index=tap_index,
            isolated=int(isolated),
        )


def set_isolated(tap: str, isolated: bool, netns: str | None = None) -> None:
    """Turn bridge port isolation of ``tap`` on or off (live; the port must be attached)."""
    _check_name(tap)
    with _ipr(netns) as ipr:
        index = _index(ipr, tap)
        if index is None:
            raise NetDeviceError(f"no TAP {tap} in {_where(netns)}")
        _call(
            f"set isolation on {tap}", netns, ipr.brport, "set", index=index, isolated=int(isolated)
        )


def delete_link(name: str, netns: str | None = None) -> bool:
    """Delete a bridge or TAP; a missing one is fine. True when something was deleted.

    Deleting a bridge releases its ports (the TAPs stay); deleting a persistent TAP while a
    VMM holds it removes it at once and the VMM's NIC goes dead.
    """
    _check_name(name)
    with _ipr(netns) as ipr:
        index = _index(ipr, name)
        if index is None:
            return False
        try:
            ipr.link("del", index=index)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:  # gone meanwhile
                return False
            raise NetDeviceError(
                f"cannot delete {name} in {_where(netns)}: {exc.args[-1]}"
            ) from exc
        return True


def list_links(prefix: str = "stk", netns: str | None = None) -> list[LinkInfo]:
    """Devices whose name starts with ``prefix`` (stoker's own, for reconciliation)."""
    with _ipr(netns) as ipr:
        return sorted(
            (
                _info(ipr, msg)
                for msg in ipr.get_links()
                if str(msg.get_attr("IFLA_IFNAME")).startswith(prefix)
            ),
            key=lambda link: link.name,
        )


def link_info(name: str, netns: str | None = None) -> LinkInfo | None:
    """One device, or None when it does not exist."""
    _check_name(name)
    with _ipr(netns) as ipr:
        index = _index(ipr, name)
        return None if index is None else _link(ipr, index)


def read_counters(tap: str, netns: str | None = None) -> TapCounters:
    """Byte and packet counters of ``tap`` (64-bit, since the device was created)."""
    _check_name(tap)
    with _ipr(netns) as ipr:
        index = _index(ipr, tap)
        if index is None:
            raise NetDeviceError(f"no device {tap} in {_where(netns)}")
        stats = ipr.get_links(index)[0].get_attr("IFLA_STATS64")
        return TapCounters(
            rx_bytes=int(stats["rx_bytes"]),
            rx_packets=int(stats["rx_packets"]),
            tx_bytes=int(stats["tx_bytes"]),
            tx_packets=int(stats["tx_packets"]),
            rx_dropped=int(stats["rx_dropped"]),
            tx_dropped=int(stats["tx_dropped"]),
        )


def open_tap_fd(tap: str, netns: str | None = None) -> int:
    """A descriptor on the existing TAP ``tap`` for a VMM (QEMU: ``-netdev tap,fd=N``).

    Opens /dev/net/tun and attaches with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR; the caller
    owns the descriptor (pass it with ``pass_fds``, then close it). Fails with EPERM when the
    TAP belongs to another uid and the caller lacks CAP_NET_ADMIN, and with EBUSY when a
    VMM holds it already. The descriptor is not inheritable until the caller says so.
    """
    _check_name(tap)

    def attach() -> int:
        try:
            socket.if_nametoindex(tap)  # TUNSETIFF would create a fresh, non-persistent TAP
        except OSError as exc:
            raise NetDeviceError(f"no TAP {tap} in {_where(netns)}: create it first") from exc
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            ifr = struct.pack("16sH22x", tap.encode(), _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR)
            fcntl.ioctl(fd, _TUNSETIFF, ifr)
        except OSError as exc:
            os.close(fd)
            hint = {
                errno.EPERM: "it belongs to another user",
                errno.EBUSY: "a VMM holds it already",
                errno.EINVAL: "it is not a TAP",
            }.get(exc.errno or 0, exc.strerror)
            raise NetDeviceError(f"cannot open TAP {tap} in {_where(netns)}: {hint}") from exc
        return fd

    try:
        return call_in_netns(netns, attach)
    except NetnsError as exc:
        raise NetDeviceError(str(exc)) from exc
