"""Can this agent make managed networks? Root, nftables, dnsmasq, /dev/net/tun, the config
switch, and a state directory the unprivileged dnsmasq can reach.

Asked once when the agent starts: the answer decides what a VM without a network gets (the
default network, or user-mode networking with a warning) and why.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from stoker.services.networks.config import NetworkConfig

__all__ = ["Availability", "probe"]

TUN = Path("/dev/net/tun")


@dataclass(frozen=True)
class Availability:
    available: bool
    #: why not (empty when available)
    reason: str = ""


def _unreachable(state_root: Path) -> Path | None:
    """The first existing directory on the way to ``state_root`` that others cannot search
    (dnsmasq re-reads its hosts file after dropping to an unprivileged user)."""
    for directory in reversed((state_root, *state_root.parents)):
        try:
            mode = directory.stat().st_mode
        except FileNotFoundError:
            continue
        if not mode & stat.S_IXOTH:
            return directory
    return None


def probe(config: NetworkConfig, state_root: Path) -> Availability:
    if not config.enabled:
        return Availability(False, "managed networking is off ([network] enabled = false)")
    if os.geteuid() != 0:
        return Availability(
            False, "the agent does not run as root (bridges, TAPs and nftables need it)"
        )
    if shutil.which(config.nft_binary) is None:
        return Availability(
            False, f"{config.nft_binary} not found: install nftables (apt-get install nftables)"
        )
    if shutil.which(config.dnsmasq_binary) is None:
        return Availability(
            False,
            f"{config.dnsmasq_binary} not found: install dnsmasq-base "
            "(apt-get install dnsmasq-base)",
        )
    if not TUN.exists():
        return Availability(False, f"{TUN} is missing: load the tun module (modprobe tun)")
    if config.dnsmasq_user != "root":
        blocked = _unreachable(state_root)
        if blocked is not None:
            return Availability(
                False,
                f"dnsmasq (running as {config.dnsmasq_user or 'nobody'}) cannot reach "
                f"{state_root}: make {blocked} searchable by others (chmod o+x {blocked})",
            )
    return Availability(True)
