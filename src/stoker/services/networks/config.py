"""The ``[network]`` config section: managed networking on or off, and the default network.

Validated when the agent starts, so a typo stops it with the key to fix::

    [network]
    enabled = true                   # false: new VMs get user-mode networking (QEMU)
    default_subnet = "10.213.0.0/24" # the `default` network, made on first use
    default_isolation = "isolated"   # or "open"
    default_ipv6 = false
    uplink = "eth0"                  # optional: masquerade the default network only out of it
    lease_time = "1h"                # DHCP lease time dnsmasq hands out
    dnsmasq_user = "nobody"          # dnsmasq drops to this user (it must reach its files)
    state_dir = "/run/stoker/..."    # dnsmasq's files (default: one per data dir, see below)

dnsmasq's files (static leases, lease database, pid file, log) live outside the data dir:
the agent keeps its data dir private (0700), and dnsmasq, which drops to an unprivileged
user, re-reads its static leases on every change. Under ``/run`` they last as long as the
dnsmasq processes themselves: until the host reboots.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from stoker.domain import ipam
from stoker.domain.networks import IFNAME_PATTERN, Isolation
from stoker.domain.spec import NAME_PATTERN

DEFAULT_SUBNET = "10.213.0.0/24"
RUN_DIR = Path("/run/stoker")


def default_state_dir(data_dir: Path) -> Path:
    """``/run/stoker/networks-<hash of the data dir>``: one per agent, so two agents (with two
    data dirs) never share dnsmasq files."""
    digest = hashlib.sha256(str(data_dir.absolute()).encode()).hexdigest()[:12]
    return RUN_DIR / f"networks-{digest}"


class NetworkConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        default=True,
        description="make managed networks (bridges, NAT, DHCP); new VMs join the default one",
    )
    default_network: str = Field(default="default", pattern=NAME_PATTERN)
    default_subnet: str = Field(default=DEFAULT_SUBNET, max_length=18)
    default_isolation: Isolation = Isolation.ISOLATED
    default_ipv6: bool = False
    uplink: str | None = Field(default=None, max_length=15, pattern=IFNAME_PATTERN)
    lease_time: str = Field(default="1h", pattern=r"^[0-9]{1,6}[smhd]?$")
    dnsmasq_user: str | None = Field(default=None, pattern=r"^[a-z_][a-z0-9_-]{0,31}$")
    state_dir: Path | None = Field(
        default=None, description="dnsmasq's files; default: /run/stoker/networks-<hash>"
    )
    dnsmasq_binary: str = "dnsmasq"
    nft_binary: str = "nft"
    #: a dnsmasq that dies is restarted after this delay, doubled up to a minute while it
    #: keeps dying within ``dnsmasq_stable_s`` of its start
    dnsmasq_restart_delay_s: float = Field(default=0.5, gt=0, le=60)
    dnsmasq_stable_s: float = Field(default=30.0, gt=0, le=3600)

    @field_validator("default_subnet")
    @classmethod
    def _subnet(cls, v: str) -> str:
        try:
            return str(ipam.validate_subnet(v))
        except ipam.IpamError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("lease_time")
    @classmethod
    def _lease(cls, v: str) -> str:
        match = re.fullmatch(r"([0-9]+)([smhd]?)", v)
        assert match is not None  # the pattern above
        seconds = int(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]
        if seconds < 120:
            raise ValueError("dnsmasq needs a lease time of at least 120 seconds (2m)")
        return v

    def state_root(self, data_dir: Path) -> Path:
        return self.state_dir or default_state_dir(data_dir)
