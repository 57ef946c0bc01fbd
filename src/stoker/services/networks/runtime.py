"""The managed networks as they are on the host right now: which are up, each one's dnsmasq
(supervised), the static leases it was last given, and the one lock every host change takes.

Callers hold :attr:`NetworkRuntime.lock` around every coroutine here except
:meth:`NetworkRuntime.stop`; the blocking host work runs in worker threads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from stoker.domain import ipam
from stoker.domain.networks import Lease, NetworkRecord
from stoker.domain.vm import VM
from stoker.host import dnsmasq, firewall
from stoker.services.networks.config import NetworkConfig
from stoker.services.networks.plumbing import NetworkHost, StrayReport
from stoker.services.networks.supervisor import DnsmasqSupervisor
from stoker.store.networks import NetworkStore

__all__ = ["NetworkRuntime"]

log = logging.getLogger("stoker.networks")


class NetworkRuntime:
    def __init__(
        self,
        config: NetworkConfig,
        store: NetworkStore,
        host: NetworkHost,
        on_restart: Callable[[NetworkRecord, int], None] | None = None,
    ) -> None:
        self.store = store
        self.on_restart = on_restart
        self.host = host
        self.lock = asyncio.Lock()
        self.supervisor = DnsmasqSupervisor(
            self._restart_dnsmasq, config.dnsmasq_restart_delay_s, config.dnsmasq_stable_s
        )
        #: network id -> its running dnsmasq (set once the network is up on the host)
        self._dnsmasq: dict[str, dnsmasq.DnsmasqProcess] = {}
        #: network id -> the static leases its dnsmasq was last given
        self._hosts: dict[str, tuple[dnsmasq.DhcpHost, ...]] = {}
        self._warnings: dict[str, tuple[str, ...]] = {}

    # ------------------------------------------------------------------------ queries

    def dnsmasq_pid(self, network_id: str) -> int | None:
        process = self._dnsmasq.get(network_id)
        return process.pid if process is not None else None

    def dnsmasq_restarts(self, network_id: str) -> int:
        return self.supervisor.restarts.get(network_id, 0)

    def warnings(self, network_id: str) -> tuple[str, ...]:
        return self._warnings.get(network_id, ())

    # ---------------------------------------------------------------------- networks

    async def ensure_up(self, net: NetworkRecord, force: bool = False) -> None:
        """The network on the host, with its dnsmasq running and supervised. Cheap when it is
        up already; ``force`` re-does every part (reconciliation after a restart)."""
        process = self._dnsmasq.get(net.id)
        if not force and process is not None and self.host.dnsmasq_running(process):
            return
        warnings = await asyncio.to_thread(self.host.bring_up, net)
        self._warnings[net.id] = tuple(warnings)
        for warning in warnings:
            log.warning("network %s: %s", net.name, warning)
        if process is None or not self.host.dnsmasq_running(process):
            process = await asyncio.to_thread(self.host.find_dnsmasq, net)  # re-adopt
        if process is None:
            process = await self._start_dnsmasq(net)
        else:
            self._dnsmasq[net.id] = process
            await self.write_leases(net, force=True)
        self.store.set_dnsmasq(net.id, process.pid, process.start_time)
        self.supervisor.watch(net.id, process)

    async def tear_down(self, net: NetworkRecord) -> None:
        """Everything of the network on the host: dnsmasq (no longer supervised), rules,
        bridge, state files."""
        self.supervisor.unwatch(net.id)
        process = self._dnsmasq.pop(net.id, None)
        self._hosts.pop(net.id, None)
        self._warnings.pop(net.id, None)
        await asyncio.to_thread(self.host.tear_down, net, process)

    def _dhcp_hosts(self, net: NetworkRecord) -> tuple[dnsmasq.DhcpHost, ...]:
        return tuple(dnsmasq.DhcpHost(le.mac, le.address) for le in self.store.leases(net.id))

    async def write_leases(self, net: NetworkRecord, force: bool = False) -> None:
        """Give the network's dnsmasq the current static leases (when they changed)."""
        hosts = self._dhcp_hosts(net)
        if not force and self._hosts.get(net.id) == hosts:
            return
        await asyncio.to_thread(self.host.write_leases, net, hosts, self._dnsmasq.get(net.id))
        self._hosts[net.id] = hosts

    async def leases_changed(self, network_ids: Sequence[str]) -> None:
        for network_id in network_ids:
            net = self.store.get(network_id)
            if net is not None and network_id in self._dnsmasq:
                await self.write_leases(net)

    async def _start_dnsmasq(self, net: NetworkRecord) -> dnsmasq.DnsmasqProcess:
        hosts = self._dhcp_hosts(net)
        process = await asyncio.to_thread(self.host.start_dnsmasq, net, hosts)
        self._dnsmasq[net.id] = process
        self._hosts[net.id] = hosts
        self.store.set_dnsmasq(net.id, process.pid, process.start_time)
        return process

    async def _restart_dnsmasq(self, network_id: str) -> dnsmasq.DnsmasqProcess | None:
        """The supervisor saw the network's dnsmasq die: start it again (None: the network
        is gone, stop watching)."""
        async with self.lock:
            net = self.store.get(network_id)
            if net is None or not self.supervisor.watching(network_id):
                return None
            self._dnsmasq.pop(network_id, None)
            await asyncio.to_thread(self.host.bring_up, net)  # the bridge may be gone too
            process = await self._start_dnsmasq(net)
        log.warning("dnsmasq of network %s started again: pid %s", net.name, process.pid)
        if self.on_restart is not None:
            self.on_restart(net, process.pid)
        return process

    # --------------------------------------------------------------------------- VMs

    async def plug(
        self, net: NetworkRecord, vm: VM, lease: Lease, uid: int | None, gid: int | None
    ) -> str:
        """The VM's TAP on the bridge, its static lease in dnsmasq, its port forwards to its
        address. Returns the TAP's name."""
        forwards = [
            firewall.PortForward(
                vm.id, pf.protocol, pf.host_addr, pf.host_port, lease.address, pf.guest_port
            )
            for pf in vm.spec.network.port_forwards
        ]
        tap = ipam.tap_name(vm.id)
        await asyncio.to_thread(self.host.attach, net, tap, vm.id, uid=uid, gid=gid)
        await self.write_leases(net)
        await asyncio.to_thread(self.host.set_forwards, vm.id, forwards)
        return tap

    async def unplug(self, vm_id: str) -> None:
        """The VM's forwards, limits and TAP: gone."""
        await asyncio.to_thread(self.host.detach, vm_id, ipam.tap_name(vm_id))

    async def remove_strays(
        self, networks: Sequence[NetworkRecord], active_vms: Sequence[str]
    ) -> StrayReport:
        pids = [p.pid for p in self._dnsmasq.values()]
        return await asyncio.to_thread(self.host.remove_strays, networks, active_vms, pids)

    async def stop(self) -> None:
        """The agent stops: dnsmasq keeps serving, TAPs and rules stay with their VMs."""
        await self.supervisor.stop()
