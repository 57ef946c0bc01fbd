"""Managed VM networking: a bridge per network with NAT, DHCP and isolation, a TAP per
running VM, addresses that stay with a VM until it is deleted, port forwards, and
reconciliation of all of it after an agent restart.

Modules: :mod:`.config` (the ``[network]`` section), :mod:`.availability` (can this agent
make networks here?), :mod:`.plumbing` (the host side: bridge, nftables, dnsmasq, TAPs),
:mod:`.supervisor` (dnsmasq restarted when it dies), :mod:`.reconcile` (what belongs to
nothing), :mod:`.service` (what the API and the lifecycle call).
"""

from stoker.services.networks.availability import Availability, probe
from stoker.services.networks.config import NetworkConfig
from stoker.services.networks.plumbing import NetworkHost
from stoker.services.networks.service import (
    LeaseView,
    NetworkingStatus,
    NetworkService,
    NetworkView,
)

__all__ = [
    "Availability",
    "LeaseView",
    "NetworkConfig",
    "NetworkHost",
    "NetworkService",
    "NetworkView",
    "NetworkingStatus",
    "probe",
]
