"""What a managed network and its VMs are on the host: a bridge with the gateway address,
stoker's nftables rules, one dnsmasq, a TAP per running VM, port forwards.

Every method blocks (netlink, ``nft``, process start): the service calls them from a worker
thread while it holds its network lock. Each one is idempotent, so the service can run them
again after an agent restart without making duplicates. Unit tests replace this class with a
fake that records calls.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from pathlib import Path
from typing import TypeVar

from stoker.domain import ipam
from stoker.domain.networks import NetworkRecord
from stoker.host import bridge, dnsmasq, firewall, netlimits
from stoker.host.addresses import connected_subnets
from stoker.host.tap import NetDeviceError as TcDeviceError
from stoker.services.networks.config import NetworkConfig
from stoker.services.networks.reconcile import (
    link_alias,
    stray_dnsmasq,
    stray_links,
    stray_state_dirs,
)

__all__ = ["HOST_ERRORS", "NetworkHost", "StrayReport"]

T = TypeVar("T")

log = logging.getLogger("stoker.networks")

#: what a failing host operation raises; the service turns each into a message for the user
HOST_ERRORS: tuple[type[Exception], ...] = (
    bridge.NetDeviceError,
    TcDeviceError,
    firewall.FirewallError,
    dnsmasq.DnsmasqError,
    OSError,
    ValueError,
)


@dataclass(frozen=True)
class StrayReport:
    """What reconciliation removed."""

    links: tuple[str, ...] = ()
    dnsmasq_pids: tuple[int, ...] = ()
    state_dirs: tuple[str, ...] = ()


class NetworkHost:
    """The host side of every managed network, in the namespace the agent runs in."""

    def __init__(self, config: NetworkConfig, state_root: Path) -> None:
        self.config = config
        self.state_root = state_root
        self.firewall = firewall.Firewall(nft=config.nft_binary)
        #: in the alias of every link this agent makes (one state directory per agent)
        self.owner = state_root.name

    # ---------------------------------------------------------------------- networks

    def state_dir(self, network_id: str) -> Path:
        return self.state_root / network_id

    def dnsmasq_config(self, net: NetworkRecord) -> dnsmasq.DnsmasqConfig:
        return dnsmasq.DnsmasqConfig(
            bridge=net.bridge,
            subnet=IPv4Network(net.subnet),
            gateway=IPv4Address(net.gateway),
            state_dir=self.state_dir(net.id),
            lease_time=self.config.lease_time,
            ipv6_subnet=IPv6Network(net.ipv6_subnet) if net.ipv6_subnet else None,
            user=self.config.dnsmasq_user,
            binary=self.config.dnsmasq_binary,
        )

    def rules(self, net: NetworkRecord) -> firewall.NetworkRules:
        return firewall.NetworkRules(
            name=net.name,
            bridge=net.bridge,
            subnet=IPv4Network(net.subnet),
            isolated=net.isolated,
            ipv6_subnet=IPv6Network(net.ipv6_subnet) if net.ipv6_subnet else None,
            uplink=net.uplink,
        )

    def bring_up(self, net: NetworkRecord) -> list[str]:
        """Bridge with the gateway, forwarding on, NAT and guard rules. Returns warnings for
        the operator: other tables whose forward policy drops the guests' traffic (stoker
        never edits another table)."""
        layout = ipam.plan(net.subnet)
        ipv6 = None
        if net.ipv6_subnet:
            ipv6 = f"{ipam.ula_gateway(IPv6Network(net.ipv6_subnet))}/64"
        firewall.enable_forwarding(ipv6=ipv6 is not None)
        bridge.ensure_bridge(
            net.bridge,
            layout.gateway_cidr,
            ipv6_cidr=ipv6,
            mac=ipam.bridge_mac(net.id),
            alias=link_alias(self.owner, f"network {net.name}"),
        )
        firewall.enable_localhost_forwards(net.bridge)
        self.firewall.set_network(self.rules(net))
        self._state_dirs(net.id)
        blockers = self.firewall.forward_blockers()
        return [
            f"{chain} drops forwarded traffic by default: allow traffic from and to "
            f"{net.bridge} there, or guests on {net.name} reach nothing beyond the host"
            for chain in blockers
        ]

    def _state_dirs(self, network_id: str) -> None:
        """The network's state directory and those above it that stoker makes, readable by
        the unprivileged dnsmasq (the agent's umask would make them owner-only)."""
        made = []
        for directory in (
            *reversed(self.state_dir(network_id).parents),
            self.state_dir(network_id),
        ):
            if not directory.exists():
                directory.mkdir()
                made.append(directory)
        for directory in (*made, self.state_root, self.state_dir(network_id)):
            directory.chmod(0o755)

    def start_dnsmasq(
        self, net: NetworkRecord, hosts: Sequence[dnsmasq.DhcpHost]
    ) -> dnsmasq.DnsmasqProcess:
        return dnsmasq.start(self.dnsmasq_config(net), hosts)

    def find_dnsmasq(self, net: NetworkRecord) -> dnsmasq.DnsmasqProcess | None:
        """The network's dnsmasq still running from before (an agent restart), if any."""
        return dnsmasq.find_running(self.state_dir(net.id))

    def dnsmasq_running(self, process: dnsmasq.DnsmasqProcess) -> bool:
        return dnsmasq.is_running(process)

    def write_leases(
        self,
        net: NetworkRecord,
        hosts: Sequence[dnsmasq.DhcpHost],
        process: dnsmasq.DnsmasqProcess | None,
    ) -> None:
        """The static leases, then a reload (SIGHUP) of the running dnsmasq."""
        dnsmasq.write_hosts_file(self.dnsmasq_config(net), hosts)
        if process is not None:
            dnsmasq.reload(process)

    def tear_down(self, net: NetworkRecord, process: dnsmasq.DnsmasqProcess | None) -> None:
        """Everything of the network: dnsmasq, rules, bridge, state files."""
        running = process or self.find_dnsmasq(net)
        if running is not None:
            dnsmasq.stop(running)
        self.firewall.remove_network(net.name)
        bridge.delete_link(net.bridge)
        shutil.rmtree(self.state_dir(net.id), ignore_errors=True)

    def connected_subnets(self) -> list[tuple[str, str]]:
        return _off_loop(connected_subnets)

    def link_exists(self, name: str) -> bool:
        return _off_loop(lambda: bridge.link_info(name) is not None)

    # --------------------------------------------------------------------------- VMs

    def attach(
        self,
        net: NetworkRecord,
        tap: str,
        vm_id: str,
        *,
        uid: int | None = None,
        gid: int | None = None,
    ) -> None:
        """The VM's TAP, up, a port of the network's bridge with its isolation. ``uid`` and
        ``gid`` own a new TAP (None: only a privileged process may attach to it, and the
        agent hands the VMM a descriptor); an existing TAP is checked only when given."""
        bridge.ensure_tap(
            tap,
            uid=uid,
            gid=gid,
            bridge=net.bridge,
            isolated=net.isolated,
            alias=link_alias(self.owner, f"vm {vm_id}"),
        )

    def set_forwards(self, vm_id: str, forwards: Sequence[firewall.PortForward]) -> None:
        self.firewall.set_forwards(vm_id, forwards)

    def detach(self, vm_id: str, tap: str) -> None:
        """The VM's forwards and packet limits, its tc shaping (and ifb), its TAP: gone."""
        self.firewall.remove_vm(vm_id)
        if bridge.link_info(tap) is not None:
            with contextlib.suppress(netlimits.NetLimitError):
                netlimits.clear_limits(tap)
            bridge.delete_link(tap)

    # ---------------------------------------------------------------- reconciliation

    def remove_strays(
        self,
        networks: Iterable[NetworkRecord],
        active_vms: Iterable[str],
        dnsmasq_pids: Iterable[int],
    ) -> StrayReport:
        """Remove stoker's links, rules, dnsmasq processes and state directories that belong
        to no known network and no active VM."""
        nets = list(networks)
        vms = set(active_vms)
        keep_taps = {ipam.tap_name(vm_id) for vm_id in vms}
        links = stray_links(bridge.list_links(), self.owner, {n.bridge for n in nets}, keep_taps)
        for link in links:
            if ipam.ifname_kind(link) == "tap":
                with contextlib.suppress(netlimits.NetLimitError):
                    netlimits.clear_limits(link)
            bridge.delete_link(link)
        self.firewall.reconcile(networks={n.name for n in nets}, vms=vms)
        strays = stray_dnsmasq(dnsmasq.list_running(), self.state_root, set(dnsmasq_pids))
        for process in strays:
            dnsmasq.stop(process)
        dirs = stray_state_dirs(self.state_root, {n.id for n in nets})
        for directory in dirs:
            shutil.rmtree(directory, ignore_errors=True)
        return StrayReport(tuple(links), tuple(p.pid for p in strays), tuple(str(d) for d in dirs))


def _off_loop(query: Callable[[], T]) -> T:
    """Run a short netlink query on a thread of its own: pyroute2 drives an event loop of
    its own and refuses to run on a thread where one runs already (the agent's), and the
    callers here are the API's synchronous checks."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="netlink") as pool:
        return pool.submit(query).result()
