"""Bandwidth limits for a VM's TAP with tc (tbf), through pyroute2.

Directions, seen from the guest:
- guest receive (host -> guest) is the TAP's egress: a root tbf on the TAP shapes it.
- guest transmit (guest -> host) is the TAP's ingress, which tbf cannot shape. It is redirected
  (ingress qdisc + match-all u32 filter + mirred) to an ifb device whose root tbf shapes it.
  That needs the ifb, u32 and mirred modules; where they are missing :func:`shape_tap` shapes
  only guest receive and says so in its result instead of pretending.

Packet rate: tbf and htb count bytes, so "pps x MTU" would be a byte limit in disguise. A real
pps limit needs ``act_police`` with a packet rate, which this kernel lacks (CONFIG_NET_ACT_POLICE
is not set; neither is sch_fq). :func:`apply_packet_rate_limit` therefore raises
:class:`PacketRateUnsupported` naming the alternative: the VMM's own rate limiter (Firecracker's
``ops`` token bucket on the network interface).

Rates are integers in bytes/s (pyroute2 reads strings with case-sensitive suffixes; we never
pass strings). Changing a limit live replaces the qdisc in place.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from stoker.host.tap import (
    NetDeviceError,
    ipr_in,
    link_index,
    validate_ifname,
    where,
)

ROOT = 0xFFFFFFFF  # TC_H_ROOT
INGRESS_PARENT = 0xFFFFFFF1  # TC_H_INGRESS
INGRESS_HANDLE = 0xFFFF0000  # "ffff:"
DEFAULT_LATENCY_US = 50_000
MIN_BURST = 1600  # at least one full frame, or nothing ever leaves
ETH_P_ALL = 0x0003


class NetLimitError(NetDeviceError):
    """A tc operation failed; the message names the device, namespace and limit."""


class PacketRateUnsupported(NotImplementedError):
    """tc on this kernel cannot enforce packets per second."""


@dataclass(frozen=True)
class ShapedDirections:
    guest_rx: bool
    guest_tx: bool
    note: str


def _check_rate(rate_bytes_per_s: int, burst_bytes: int) -> None:
    if isinstance(rate_bytes_per_s, bool) or not isinstance(rate_bytes_per_s, int):
        raise TypeError(f"rate must be an int in bytes/s, not {rate_bytes_per_s!r}")
    if isinstance(burst_bytes, bool) or not isinstance(burst_bytes, int):
        raise TypeError(f"burst must be an int in bytes, not {burst_bytes!r}")
    if not 0 < rate_bytes_per_s < 2**32:
        raise ValueError(f"rate must be 1..{2**32 - 1} bytes/s, not {rate_bytes_per_s}")
    if burst_bytes < MIN_BURST:
        raise ValueError(f"burst must be at least {MIN_BURST} bytes (one frame), not {burst_bytes}")


@cache
def _tick_in_usec() -> float:
    """Kernel tc ticks per microsecond, as iproute2 computes it from /proc/net/psched."""
    t2us, us2t, clock_res, _ = (int(x, 16) for x in Path("/proc/net/psched").read_text().split())
    if clock_res == 1_000_000_000:
        t2us = us2t
    return t2us / us2t * (clock_res / 1_000_000)


@cache
def kernel_tc_support() -> dict[str, bool | None]:
    """Which tc pieces this kernel was built with (None when /proc/config.gz is absent)."""
    options = {
        "tbf": "CONFIG_NET_SCH_TBF",
        "htb": "CONFIG_NET_SCH_HTB",
        "fq": "CONFIG_NET_SCH_FQ",
        "ingress": "CONFIG_NET_SCH_INGRESS",
        "u32": "CONFIG_NET_CLS_U32",
        "mirred": "CONFIG_NET_ACT_MIRRED",
        "police": "CONFIG_NET_ACT_POLICE",
        "ifb": "CONFIG_IFB",
    }
    try:
        text = gzip.decompress(Path("/proc/config.gz").read_bytes()).decode()
    except OSError:
        return dict.fromkeys(options)
    built = {line.split("=")[0] for line in text.splitlines() if line.endswith(("=y", "=m"))}
    return {name: opt in built for name, opt in options.items()}


def _index(ipr: IPRoute, ifname: str, netns: str | None) -> int:
    index = link_index(ipr, validate_ifname(ifname))
    if index is None:
        raise NetLimitError(f"no device {ifname} in {where(netns)}")
    return index


def _root_tbf(
    ipr: IPRoute, index: int, ifname: str, rate: int, burst: int, netns: str | None
) -> None:
    try:
        ipr.tc("replace", "tbf", index, rate=rate, burst=burst, latency=DEFAULT_LATENCY_US)
    except NetlinkError as exc:
        raise NetLimitError(
            f"cannot set tbf rate={rate} B/s burst={burst} B on {ifname} in {where(netns)}: {exc}"
        ) from exc


def apply_egress_limit(
    ifname: str, rate_bytes_per_s: int, burst_bytes: int, netns: str | None = None
) -> None:
    """Shape what ``ifname`` sends (for a TAP: what the guest receives). Replaces live."""
    _check_rate(rate_bytes_per_s, burst_bytes)
    with ipr_in(netns) as ipr:
        index = _index(ipr, ifname, netns)
        _root_tbf(ipr, index, ifname, rate_bytes_per_s, burst_bytes, netns)


def ifb_name(ifname: str) -> str:
    """A stable, 15-byte ifb name per device, so clear_limits can find it again."""
    return "ifb" + hashlib.sha1(ifname.encode()).hexdigest()[:12]


def apply_ingress_limit(
    ifname: str, rate_bytes_per_s: int, burst_bytes: int, netns: str | None = None
) -> str:
    """Shape what ``ifname`` receives (for a TAP: what the guest sends) via an ifb; returns it.

    Raises NetLimitError naming the missing piece when ifb, u32 or mirred are unavailable.
    """
    _check_rate(rate_bytes_per_s, burst_bytes)
    ifb = ifb_name(ifname)
    with ipr_in(netns) as ipr:
        index = _index(ipr, ifname, netns)
        ifb_index = link_index(ipr, ifb)
        try:
            if ifb_index is None:
                ipr.link("add", ifname=ifb, kind="ifb")
                ifb_index = _index(ipr, ifb, netns)
            ipr.link("set", index=ifb_index, state="up")
        except NetlinkError as exc:
            raise NetLimitError(
                f"cannot create ifb {ifb} in {where(netns)} (no ifb?): {exc}"
            ) from exc
        _root_tbf(ipr, ifb_index, ifb, rate_bytes_per_s, burst_bytes, netns)
        if not _has_ingress(ipr, index):
            try:
                ipr.tc("add", "ingress", index, INGRESS_HANDLE)
                ipr.tc(
                    "add-filter",
                    "u32",
                    index,
                    parent=INGRESS_HANDLE,
                    protocol=ETH_P_ALL,
                    keys=["0x0/0x0+0"],  # match every packet
                    target=0x10001,  # a classid pyroute2 insists on; redirect ignores it
                    action={
                        "kind": "mirred",
                        "direction": "egress",
                        "action": "redirect",
                        "ifindex": ifb_index,
                    },
                )
            except (NetlinkError, KeyError) as exc:
                # leave nothing half-built: no ingress qdisc, no ifb
                _delete_qdisc(ipr, index, INGRESS_PARENT)
                ipr.link("del", index=ifb_index)
                raise NetLimitError(
                    f"cannot redirect {ifname}'s ingress to {ifb} in {where(netns)} "
                    f"(needs sch_ingress, cls_u32, act_mirred): {exc}"
                ) from exc
    return ifb


def shape_tap(
    tap: str,
    guest_rx_bytes_per_s: int | None,
    guest_tx_bytes_per_s: int | None,
    burst_bytes: int,
    netns: str | None = None,
) -> ShapedDirections:
    """Limit both directions of a VM's TAP where the kernel allows; report what was shaped."""
    if guest_rx_bytes_per_s is not None:
        apply_egress_limit(tap, guest_rx_bytes_per_s, burst_bytes, netns)
    if guest_tx_bytes_per_s is None:
        return ShapedDirections(guest_rx_bytes_per_s is not None, False, "no guest_tx limit asked")
    try:
        apply_ingress_limit(tap, guest_tx_bytes_per_s, burst_bytes, netns)
    except NetLimitError as exc:
        return ShapedDirections(
            guest_rx_bytes_per_s is not None, False, f"guest transmit NOT shaped: {exc}"
        )
    return ShapedDirections(guest_rx_bytes_per_s is not None, True, "shaped")


def apply_packet_rate_limit(ifname: str, packets_per_s: int, netns: str | None = None) -> None:
    """Always raises: tbf/htb limit bytes, and act_police (packet rate) is missing here."""
    if packets_per_s <= 0:
        raise ValueError(f"packets_per_s must be positive, not {packets_per_s}")
    support = kernel_tc_support()
    raise PacketRateUnsupported(
        f"cannot limit {ifname} to {packets_per_s} packets/s with tc: tbf and htb count bytes, "
        f"and a packet-rate police action needs CONFIG_NET_ACT_POLICE "
        f"(this kernel: police={support['police']}, fq={support['fq']}). Use the VMM's rate "
        "limiter instead (Firecracker network-interface rate_limiter 'ops' bucket: size = "
        "pps * refill_time_ms / 1000)"
    )


def _has_ingress(ipr: IPRoute, index: int) -> bool:
    return any(q.get_attr("TCA_KIND") == "ingress" for q in ipr.get_qdiscs(index=index))


def _delete_qdisc(ipr: IPRoute, index: int, parent: int) -> None:
    try:
        ipr.tc("del", index=index, parent=parent)
    except NetlinkError as exc:
        # ENOENT / EINVAL: nothing of ours there (the default qdisc cannot be deleted)
        if exc.code not in (2, 22):
            raise


def clear_limits(ifname: str, netns: str | None = None) -> None:
    """Remove our root tbf, the ingress redirect and the ifb. Idempotent.

    Deletes by parent (root = 0xFFFFFFFF), since deleting a tbf by kind raises KeyError in
    pyroute2 0.9.7.
    """
    with ipr_in(netns) as ipr:
        index = _index(ipr, ifname, netns)
        try:
            root = _root_qdisc(ipr, index)
            if root is not None and root.get_attr("TCA_KIND") == "tbf":
                _delete_qdisc(ipr, index, ROOT)
            if _has_ingress(ipr, index):
                _delete_qdisc(ipr, index, INGRESS_PARENT)
            ifb_index = link_index(ipr, ifb_name(ifname))
            if ifb_index is not None:
                ipr.link("del", index=ifb_index)
        except NetlinkError as exc:
            raise NetLimitError(
                f"cannot clear limits on {ifname} in {where(netns)}: {exc}"
            ) from exc


def _root_qdisc(ipr: IPRoute, index: int) -> Any:
    for qdisc in ipr.get_qdiscs(index=index):
        if qdisc["parent"] == ROOT:
            return qdisc
    return None


def _describe(qdisc: Any) -> dict[str, Any]:
    kind = qdisc.get_attr("TCA_KIND")
    out: dict[str, Any] = {"kind": kind, "handle": qdisc["handle"], "parent": qdisc["parent"]}
    if kind == "tbf":
        parms = qdisc.get_attr("TCA_OPTIONS").get_attr("TCA_TBF_PARMS")
        rate = parms["rate"]
        out["rate"] = rate
        out["burst"] = round(rate * parms["buffer"] / _tick_in_usec() / 1_000_000)
        out["limit"] = parms["limit"]
    return out


def read_qdisc(ifname: str, netns: str | None = None) -> dict[str, Any]:
    """The kernel's view of ``ifname``'s root qdisc: kind, and for tbf rate (B/s), burst (B),
    limit (B); plus ``ingress_redirect`` and, when present, ``ifb`` with the ifb's root qdisc."""
    with ipr_in(netns) as ipr:
        index = _index(ipr, ifname, netns)
        root = _root_qdisc(ipr, index)
        out: dict[str, Any] = _describe(root) if root is not None else {"kind": None}
        out["ingress_redirect"] = _has_ingress(ipr, index)
        ifb_index = link_index(ipr, ifb_name(ifname))
        if ifb_index is not None:
            ifb_root = _root_qdisc(ipr, ifb_index)
            out["ifb"] = _describe(ifb_root) if ifb_root is not None else {"kind": None}
        return out
