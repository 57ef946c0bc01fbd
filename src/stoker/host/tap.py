"""TAP devices for guest NICs, created through netlink (pyroute2), optionally in a netns.

Idempotent so a restarted agent can re-run its setup: creating a TAP that exists is fine,
but a same-named device of another kind is an error, never silently reused.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns
from pyroute2.netlink.exceptions import NetlinkError

_IFNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")


class NetDeviceError(RuntimeError):
    """A netlink operation on a device failed; the message names the device and namespace."""


def validate_ifname(name: str) -> str:
    """Linux allows 15 bytes and no '/', ':' or whitespace; we also refuse a leading '-'."""
    if not _IFNAME_RE.fullmatch(name):
        raise ValueError(f"invalid interface name {name!r}: 1-15 of [A-Za-z0-9_.-]")
    return name


def where(netns: str | None) -> str:
    return f"netns {netns}" if netns else "the host namespace"


@contextmanager
def ipr_in(netns: str | None) -> Iterator[IPRoute]:
    """An IPRoute socket in ``netns``; refuses a missing netns instead of creating one."""
    if netns is not None and netns not in pr_netns.listnetns():
        raise NetDeviceError(f"network namespace {netns!r} does not exist")
    ipr = IPRoute(netns=netns) if netns else IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def link_index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _link_kind(ipr: IPRoute, index: int) -> str | None:
    link = ipr.get_links(index)[0]
    info = link.get_attr("IFLA_LINKINFO")
    if info is None:
        return None
    kind: str | None = info.get_attr("IFLA_INFO_KIND")
    if kind == "tun":
        data = info.get_attr("IFLA_INFO_DATA")
        # IFLA_TUN_TYPE: 1 = tun, 2 = tap
        if data is not None and data.get_attr("IFLA_TUN_TYPE") == 2:
            return "tap"
    return kind


def tap_exists(name: str, netns: str | None = None) -> bool:
    with ipr_in(netns) as ipr:
        return link_index(ipr, validate_ifname(name)) is not None


def create_tap(name: str, netns: str | None = None, up: bool = True) -> int:
    """Create (or find) TAP ``name`` and bring it up; returns its ifindex."""
    validate_ifname(name)
    with ipr_in(netns) as ipr:
        index = link_index(ipr, name)
        if index is None:
            try:
                ipr.link("add", ifname=name, kind="tuntap", mode="tap")
            except NetlinkError as exc:
                raise NetDeviceError(f"cannot create TAP {name} in {where(netns)}: {exc}") from exc
            index = link_index(ipr, name)
            if index is None:
                raise NetDeviceError(f"TAP {name} vanished right after creation in {where(netns)}")
        else:
            kind = _link_kind(ipr, index)
            if kind not in ("tap", "tun"):
                raise NetDeviceError(
                    f"{name} already exists in {where(netns)} as {kind or 'a device'}, not a TAP"
                )
        if up:
            try:
                ipr.link("set", index=index, state="up")
            except NetlinkError as exc:
                raise NetDeviceError(f"cannot bring up {name} in {where(netns)}: {exc}") from exc
        return index


def delete_tap(name: str, netns: str | None = None) -> None:
    """Delete TAP ``name``; deleting one that is already gone is fine."""
    validate_ifname(name)
    with ipr_in(netns) as ipr:
        index = link_index(ipr, name)
        if index is None:
            return
        try:
            ipr.link("del", index=index)
        except NetlinkError as exc:
            raise NetDeviceError(f"cannot delete {name} in {where(netns)}: {exc}") from exc
