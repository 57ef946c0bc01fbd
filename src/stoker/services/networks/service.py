"""The network service: managed networks as objects, addresses for VMs, and each VM's NIC on
the host from start to stop.

For the lifecycle it is four narrow things: the :class:`SpecDefaults` that gives a VM
without a network the default one (or user-mode networking, with a warning, where this agent
cannot make networks), a create check (the network exists or is the default, it has a free
address, the forwarded host ports are free), the :class:`NetworkAttacher` that makes the
VM's TAP, DHCP lease and port forwards ready before every launch, and, for health probes,
the :class:`AddressBook` of VM addresses.

Addresses: a VM gets its lease when it is created (the ``vm.created`` event is handled
synchronously, inside the create request) and keeps it until it is deleted. Its TAP and
forwards exist while it runs: removed when it stops or fails (``vm.state``), and when it is
deleted (``vm.deleted``, which also releases the address). Host changes are serialised by
one lock; each one is idempotent, so :meth:`reconcile` can redo them all after an agent
restart and remove what belongs to nothing, without duplicates.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from stoker.domain import ipam
from stoker.domain.capabilities import Capabilities
from stoker.domain.events import Event, EventType
from stoker.domain.networks import (
    ForwardOwner,
    Lease,
    NetworkRecord,
    NetworkSpec,
    forward_conflicts,
)
from stoker.domain.spec import Hypervisor, Network, NetworkMode, VMSpec
from stoker.domain.states import ACTIVE_STATES, VMState
from stoker.domain.vm import VM
from stoker.drivers.base import NetAttachment
from stoker.services.directory import VMDirectory
from stoker.services.errors import Conflict, InvalidSpec, NetworkError, NotFound
from stoker.services.events import EventBus
from stoker.services.networks.availability import Availability
from stoker.services.networks.config import NetworkConfig
from stoker.services.networks.plumbing import HOST_ERRORS, NetworkHost
from stoker.services.networks.runtime import NetworkRuntime
from stoker.store.networks import NetworkStore, NetworkTaken

__all__ = ["LeaseView", "NetworkService", "NetworkView", "NetworkingStatus"]

log = logging.getLogger("stoker.networks")

CapabilitiesOf = Callable[[VMSpec], Capabilities]


@dataclass(frozen=True)
class LeaseView:
    lease: Lease
    vm_name: str | None
    vm_state: VMState | None


@dataclass(frozen=True)
class NetworkView:
    """One network with its leases and its DHCP server, as the API shows it."""

    record: NetworkRecord
    pool_size: int
    leases: tuple[LeaseView, ...]
    dnsmasq_pid: int | None
    dnsmasq_restarts: int
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class NetworkingStatus:
    """What this agent can do, and what a VM created without a network gets."""

    available: bool
    reason: str
    default_network: str
    default_subnet: str
    #: hypervisor -> network mode a VM without one gets ("managed", "user" or "none")
    default_modes: dict[str, str]


def _managed(spec: VMSpec) -> bool:
    return spec.network.mode == NetworkMode.MANAGED


class NetworkService:
    def __init__(
        self,
        config: NetworkConfig,
        store: NetworkStore,
        directory: VMDirectory,
        host: NetworkHost,
        availability: Availability,
        capabilities_of: CapabilitiesOf,
        clock: Callable[[], datetime] | None = None,
        events: EventBus | None = None,
    ) -> None:
        self.config = config
        self.events = events
        self.store = store
        self.directory = directory
        self.host = host
        self.availability = availability
        self.capabilities_of = capabilities_of
        self.clock = clock or (lambda: datetime.now(UTC))
        self.runtime = NetworkRuntime(config, store, host, on_restart=self._dnsmasq_restarted)

    # ------------------------------------------------------------------------- status

    @property
    def available(self) -> bool:
        return self.availability.available

    def status(self) -> NetworkingStatus:
        modes = {h.value: self._default_mode(h) for h in Hypervisor}
        return NetworkingStatus(
            available=self.available,
            reason=self.availability.reason,
            default_network=self.config.default_network,
            default_subnet=self.config.default_subnet,
            default_modes=modes,
        )

    def _default_mode(self, hypervisor: Hypervisor) -> str:
        if self.available:
            return NetworkMode.MANAGED.value
        # capabilities belong to the hypervisor a spec names: any spec of it will do
        probe = VMSpec(name="probe", kernel="/probe", hypervisor=hypervisor)
        if self.capabilities_of(probe).user_networking:
            return NetworkMode.USER.value
        return NetworkMode.NONE.value

    def _require_available(self) -> None:
        if not self.available:
            raise Conflict(
                f"managed networking is not available on this agent: {self.availability.reason}"
            )

    # ----------------------------------------------------------------------- queries

    def get_record(self, ref: str) -> NetworkRecord:
        net = self.store.get(ref)
        if net is None:
            names = ", ".join(n.name for n in self.store.all()) or "none yet"
            raise NotFound(f"no network named or with id {ref!r} (networks: {names})")
        return net

    def view(self, ref: str) -> NetworkView:
        return self._view(self.get_record(ref))

    def all(self) -> list[NetworkView]:
        return [self._view(net) for net in self.store.all()]

    def _view(self, net: NetworkRecord) -> NetworkView:
        leases = []
        for lease in self.store.leases(net.id):
            vm = self.directory.find(lease.vm_id)
            leases.append(LeaseView(lease, vm.name if vm else None, vm.state if vm else None))
        return NetworkView(
            record=net,
            pool_size=ipam.plan(net.subnet).pool_size,
            leases=tuple(leases),
            dnsmasq_pid=self.runtime.dnsmasq_pid(net.id),
            dnsmasq_restarts=self.runtime.dnsmasq_restarts(net.id),
            warnings=self.runtime.warnings(net.id),
        )

    def address_of(self, vm_id: str) -> str | None:
        """The VM's own address on its managed network (health probes with host 'vm')."""
        vm = self.directory.find(vm_id)
        if vm is None or not _managed(vm.spec) or vm.spec.network.name is None:
            return None
        net = self.store.get(vm.spec.network.name)
        lease = self.store.lease(net.id, vm_id) if net is not None else None
        return lease.address if lease is not None else None

    # --------------------------------------------------------------- create and delete

    def _check_subnet(self, subnet: str) -> str:
        """A free private subnet: overlapping no network and no subnet the host is on."""
        existing: dict[str, str] = {f"network {n.name!r}": n.subnet for n in self.store.all()}
        known = {n.bridge for n in self.store.all()}
        for ifname, connected in self.host.connected_subnets():
            if ifname not in known and not ipam.is_stoker_ifname(ifname):
                existing[f"host interface {ifname}"] = connected
        return str(ipam.validate_subnet(subnet, existing))

    async def create(self, spec: NetworkSpec, managed_by: str = "api") -> NetworkView:
        """A new network, up on the host (bridge, NAT, DHCP) before this returns; nothing is
        left behind when any part of it fails."""
        self._require_available()
        if self.store.get(spec.name) is not None:
            raise Conflict(f"a network named {spec.name!r} exists already")
        try:
            subnet = self._check_subnet(spec.subnet)
        except ipam.SubnetOverlap as exc:
            raise Conflict(str(exc)) from None
        except ipam.IpamError as exc:
            raise InvalidSpec("subnet", str(exc)) from None
        net = self._record(spec, subnet, managed_by)
        if spec.bridge is not None and self.host.link_exists(spec.bridge):
            raise Conflict(
                f"interface {spec.bridge} exists already on this host: choose another bridge "
                "name, or leave it out for one stoker derives"
            )
        if spec.uplink is not None and not self.host.link_exists(spec.uplink):
            raise InvalidSpec("uplink", f"no interface {spec.uplink} on this host")
        try:
            self.store.insert(net)
        except NetworkTaken as exc:
            raise Conflict(str(exc)) from None
        async with self.runtime.lock:
            try:
                await self.runtime.ensure_up(net)
            except HOST_ERRORS as exc:
                await self._undo(net)
                raise Conflict(
                    f"could not set up network {net.name!r} on the host: {exc}; "
                    "nothing was left behind"
                ) from None
        log.info("network %s created: %s on %s", net.name, net.subnet, net.bridge)
        self._publish(
            EventType.NETWORK_CREATED,
            f"network {net.name} created: {net.subnet} on bridge {net.bridge}",
            network=net.name,
            subnet=net.subnet,
        )
        return self._view(net)

    def _publish(self, kind: EventType, message: str, **data: str | int) -> None:
        if self.events is not None:
            self.events.publish(kind, message, None, **data)

    def _dnsmasq_restarted(self, net: NetworkRecord, pid: int) -> None:
        self._publish(
            EventType.NETWORK_DNSMASQ_RESTARTED,
            f"network {net.name}: its dnsmasq died and was started again (pid {pid})",
            network=net.name,
            pid=pid,
        )

    def _record(self, spec: NetworkSpec, subnet: str, managed_by: str) -> NetworkRecord:
        network_id = uuid.uuid4().hex[:16]
        return NetworkRecord(
            id=network_id,
            name=spec.name,
            subnet=subnet,
            gateway=str(ipam.gateway(subnet)),
            isolation=spec.isolation,
            bridge=spec.bridge or ipam.bridge_name(network_id),
            created_at=self.clock(),
            managed_by=managed_by,
            ipv6_subnet=str(ipam.ula_subnet(network_id)) if spec.ipv6 else None,
            uplink=spec.uplink,
        )

    async def _undo(self, net: NetworkRecord) -> None:
        """The network gone from the host and the store; the lock is held."""
        try:
            await self.runtime.tear_down(net)
        except HOST_ERRORS:
            log.exception("cleaning up network %s failed", net.name)
        self.store.delete(net.id)

    async def delete(self, ref: str) -> None:
        """Remove a network no VM uses: its bridge, rules, dnsmasq and records."""
        net = self.get_record(ref)
        users = sorted(
            vm.name
            for vm in self.directory.all()
            if _managed(vm.spec) and vm.spec.network.name == net.name
        )
        if users:
            raise Conflict(
                f"network {net.name!r} is in use by {len(users)} VM(s): {', '.join(users)}; "
                "delete them first"
            )
        async with self.runtime.lock:
            if self.available:
                await self._undo(net)
            else:
                self.store.delete(net.id)
        log.info("network %s deleted", net.name)
        self._publish(EventType.NETWORK_DELETED, f"network {net.name} deleted", network=net.name)

    def _default_record(self) -> NetworkRecord:
        """The default network, recorded on first use from ``[network] default_subnet``
        (its host side comes up with its first VM)."""
        name = self.config.default_network
        net = self.store.get(name)
        if net is not None:
            return net
        spec = NetworkSpec(
            name=name,
            subnet=self.config.default_subnet,
            isolation=self.config.default_isolation,
            ipv6=self.config.default_ipv6,
            uplink=self.config.uplink,
        )
        try:
            subnet = self._check_subnet(spec.subnet)
        except ipam.IpamError as exc:
            raise InvalidSpec(
                "network.name",
                f"the {name!r} network cannot be made from [network] default_subnet: {exc}; "
                "change default_subnet in the agent's configuration",
            ) from None
        net = self._record(spec, subnet, managed_by="config")
        try:
            self.store.insert(net)
        except NetworkTaken:  # made meanwhile
            made = self.store.get(name)
            assert made is not None
            return made
        log.info("default network %s recorded: %s", name, subnet)
        return net

    # ------------------------------------------------------------------ the lifecycle

    def complete(self, spec: VMSpec) -> VMSpec:
        """A VM whose request names no network mode joins the default network when this
        agent can make it; else it gets user-mode networking (QEMU), with a warning."""
        given = spec.network
        if "mode" in given.model_fields_set or given.tap is not None:
            return spec
        if self.available:
            network = Network(
                mode=NetworkMode.MANAGED, name=self.config.default_network, mac=given.mac
            )
        elif self.capabilities_of(spec).user_networking:
            log.warning(
                "VM %s gets user-mode networking, not the %s network: %s",
                spec.name,
                self.config.default_network,
                self.availability.reason,
            )
            network = Network(mode=NetworkMode.USER, mac=given.mac)
        else:
            log.warning(
                "VM %s gets no network device: %s, and %s has no user-mode networking",
                spec.name,
                self.availability.reason,
                spec.hypervisor.value,
            )
            return spec
        return spec.model_copy(update={"network": network})

    def check_create(self, spec: VMSpec) -> None:
        """The VM's network exists (or is the default), has a free address and its
        forwarded host ports are free."""
        if not _managed(spec):
            return
        if not self.available:
            raise InvalidSpec(
                "network.mode",
                f"managed networking is not available on this agent: {self.availability.reason};"
                " use network mode 'user' or 'tap'",
            )
        name = spec.network.name or self.config.default_network
        net = self.store.get(name)
        if net is None and name != self.config.default_network:
            names = ", ".join(n.name for n in self.store.all()) or "none yet"
            raise InvalidSpec(
                "network.name",
                f"no network named {name!r} (networks: {names}): create it first with "
                f"`stoker network create {name} --subnet CIDR`",
            )
        if net is None:
            try:
                self._check_subnet(self.config.default_subnet)
            except ipam.IpamError as exc:
                raise InvalidSpec(
                    "network.name",
                    f"the {name!r} network cannot be made from [network] default_subnet: "
                    f"{exc}; change default_subnet in the agent's configuration",
                ) from None
        else:
            self._check_free_address(net, spec)
        self._check_forwards(spec)

    def _check_free_address(self, net: NetworkRecord, spec: VMSpec) -> None:
        layout = ipam.plan(net.subnet)
        leases = self.store.leases(net.id)
        if len(leases) >= layout.pool_size:
            raise Conflict(
                f"network {net.name!r} has no free address: all {layout.pool_size} addresses "
                f"of {net.subnet} are held by VMs; delete a VM on it or use a network with a "
                "larger subnet"
            )
        mac = spec.network.mac
        if mac is not None and any(lease.mac == mac for lease in leases):
            raise InvalidSpec("network.mac", f"MAC {mac} is used by another VM on {net.name}")

    def _check_forwards(self, spec: VMSpec) -> None:
        owners = [
            ForwardOwner(vm.name, fwd)
            for vm in self.directory.all()
            if vm.name != spec.name
            for fwd in vm.spec.network.port_forwards
        ]
        for fwd, other in forward_conflicts(spec.network.port_forwards, owners):
            raise Conflict(
                f"host port {fwd.protocol} {fwd.host_addr}:{fwd.host_port} is forwarded to VM "
                f"{other.vm_name!r} already: choose another host port"
            )

    def _network_of(self, spec: VMSpec) -> NetworkRecord:
        name = spec.network.name or self.config.default_network
        if name == self.config.default_network:
            return self._default_record()
        net = self.store.get(name)
        if net is None:
            raise NetworkError(f"network {name!r} does not exist (deleted?): create it again")
        return net

    def _lease(self, vm: VM, net: NetworkRecord) -> Lease:
        mac = vm.spec.network.mac or ipam.mac_for_vm(vm.id, net.id)
        return self.store.allocate(net.id, vm.id, mac, self.clock())

    async def attach(
        self, vm: VM, uid: int | None = None, gid: int | None = None
    ) -> NetAttachment | None:
        """The VM's NIC, ready on its network before its VMM starts: the network up on the
        host, the VM's address in dnsmasq's static leases, its TAP on the bridge (owned by
        ``uid``/``gid`` when given), its port forwards to its address."""
        if not _managed(vm.spec):
            return None
        if not self.available:
            raise NetworkError(f"managed networking is not available: {self.availability.reason}")
        try:
            net = self._network_of(vm.spec)
            lease = self._lease(vm, net)
        except InvalidSpec as exc:
            raise NetworkError(exc.detail) from None
        except ipam.IpamError as exc:
            raise NetworkError(str(exc)) from None
        async with self.runtime.lock:
            try:
                await self.runtime.ensure_up(net)
                tap = await self.runtime.plug(net, vm, lease, uid, gid)
            except HOST_ERRORS as exc:
                raise NetworkError(f"network {net.name}: {exc}") from None
        return NetAttachment(
            tap=tap, mac=lease.mac, address=lease.address, gateway=net.gateway, network=net.name
        )

    # ------------------------------------------------------------------------ events

    def on_event(self, event: Event) -> Awaitable[None] | None:
        """``vm.created``: the address, at once (inside the create request). ``vm.state`` to
        stopped or error: the TAP and forwards go. ``vm.deleted``: those and the address."""
        vm_id = event.vm_id
        if vm_id is None or not self.available:
            return None
        if event.type == EventType.VM_CREATED:
            self._lease_new_vm(vm_id)
        elif event.type == EventType.VM_STATE and event.data.get("to_state") in (
            VMState.STOPPED.value,
            VMState.ERROR.value,
        ):
            return self._detach_stopped(vm_id)
        elif event.type == EventType.VM_DELETED:
            # the address goes at once (in the delete request); the host work after it
            return self._forget(vm_id, self.store.release(vm_id))
        return None

    def _lease_new_vm(self, vm_id: str) -> None:
        vm = self.directory.find(vm_id)
        if vm is None or not _managed(vm.spec):
            return
        try:
            lease = self._lease(vm, self._network_of(vm.spec))
        except (ipam.IpamError, InvalidSpec, NetworkError) as exc:
            # its start will try again and fail with this reason
            log.warning("no address for VM %s yet: %s", vm.name, exc)
            return
        log.info("VM %s holds %s on network %s", vm.name, lease.address, vm.spec.network.name)

    async def _detach_stopped(self, vm_id: str) -> None:
        async with self.runtime.lock:
            vm = self.directory.find(vm_id)
            # a start may have come between the event and now: its TAP stays
            if vm is None or not _managed(vm.spec) or vm.state in ACTIVE_STATES:
                return
            try:
                await self.runtime.unplug(vm_id)
            except HOST_ERRORS:
                log.exception("removing the TAP of VM %s failed", vm.name)

    async def _forget(self, vm_id: str, network_ids: list[str]) -> None:
        async with self.runtime.lock:
            try:
                await self.runtime.unplug(vm_id)
                await self.runtime.leases_changed(network_ids)
            except HOST_ERRORS:
                log.exception("cleaning up after deleted VM %s failed", vm_id)

    # ------------------------------------------------------------ agent start and stop

    async def start(self) -> None:
        """After VMs were re-adopted: every network up, every active VM plugged in again,
        everything of stoker's that belongs to nothing removed."""
        if not self.available:
            if self.store.all():
                log.warning(
                    "managed networks exist but are not set up: %s", self.availability.reason
                )
            return
        await self.reconcile()

    async def stop(self) -> None:
        """The agent stops: dnsmasq keeps serving, TAPs and rules stay with their VMs."""
        await self.runtime.stop()

    async def reconcile(self) -> None:
        """Every network up, every active VM plugged in again (no duplicates: each step is
        idempotent), stoker's objects that belong to nothing removed."""
        async with self.runtime.lock:
            vms = self.directory.all()
            known_vms = {vm.id for vm in vms}
            for lease in self.store.leases():
                if lease.vm_id not in known_vms:
                    self.store.release(lease.vm_id)
            networks = self.store.all()
            by_name = {net.name: net for net in networks}
            for net in networks:
                try:
                    await self.runtime.ensure_up(net, force=True)
                except HOST_ERRORS:
                    log.exception("network %s could not be set up", net.name)
            active = [vm for vm in vms if _managed(vm.spec) and vm.state in ACTIVE_STATES]
            for vm in active:
                home = by_name.get(vm.spec.network.name or "")
                if home is None:
                    log.error(
                        "VM %s runs on network %s, which is gone", vm.name, vm.spec.network.name
                    )
                    continue
                try:
                    await self.runtime.plug(home, vm, self._lease(vm, home), None, None)
                except HOST_ERRORS:
                    log.exception("VM %s could not be plugged into %s again", vm.name, home.name)
            try:
                report = await self.runtime.remove_strays(networks, [vm.id for vm in active])
            except HOST_ERRORS:
                log.exception("removing stray network objects failed")
                return
        if report.links or report.dnsmasq_pids or report.state_dirs:
            log.info(
                "network reconciliation removed links %s, dnsmasq %s, state %s",
                list(report.links),
                list(report.dnsmasq_pids),
                list(report.state_dirs),
            )
