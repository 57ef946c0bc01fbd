"""The network service on the real lifecycle, store and event bus, with the host side
replaced by a recorder (no bridge, no nft, no dnsmasq): defaults, checks, addresses, the
NIC from start to stop, reconciliation and dnsmasq supervision.

The fake dnsmasq is a real ``sleep`` process, so the supervisor watches a real pidfd.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from stoker.domain import ipam
from stoker.domain.networks import NetworkRecord, NetworkSpec
from stoker.domain.spec import NetworkMode, VMSpec
from stoker.domain.states import VMState
from stoker.host import dnsmasq, firewall
from stoker.host.bridge import LinkInfo
from stoker.host.proc import is_same_live_process, read_start_time
from stoker.services.directory import VMDirectory
from stoker.services.errors import Conflict, InvalidSpec, NotFound
from stoker.services.events import EventBus
from stoker.services.lifecycle import Lifecycle
from stoker.services.networks import Availability, NetworkConfig, NetworkHost, NetworkService
from stoker.services.networks.plumbing import StrayReport
from stoker.services.networks.reconcile import (
    link_alias,
    stray_dnsmasq,
    stray_links,
    stray_state_dirs,
)
from stoker.store.db import Database
from stoker.store.events import EventStore
from stoker.store.networks import NetworkStore
from stoker.store.vms import VMStore
from tests.fakes import QEMU_LIKE, FakeDriver

S = VMState


class FakeHost(NetworkHost):
    """Records what the service asks of the host; dnsmasq is a ``sleep`` child."""

    def __init__(self, config: NetworkConfig, state_root: Path) -> None:
        super().__init__(config, state_root)
        self.calls: list[tuple[Any, ...]] = []
        self.children: list[subprocess.Popen[bytes]] = []
        self.fail_bring_up: str | None = None
        self.host_subnets: list[tuple[str, str]] = [("eth0", "192.168.1.0/24")]
        self.links: set[str] = {"eth0", "lo"}
        self.forwards: dict[str, list[firewall.PortForward]] = {}
        self.leases: dict[str, tuple[dnsmasq.DhcpHost, ...]] = {}

    def bring_up(self, net: NetworkRecord) -> list[str]:
        self.calls.append(("bring_up", net.name))
        if self.fail_bring_up:
            raise firewall.FirewallError(self.fail_bring_up)
        self.links.add(net.bridge)
        return []

    def start_dnsmasq(
        self, net: NetworkRecord, hosts: Sequence[dnsmasq.DhcpHost]
    ) -> dnsmasq.DnsmasqProcess:
        child = subprocess.Popen(["sleep", "600"], start_new_session=True)
        self.children.append(child)
        self.calls.append(("start_dnsmasq", net.name))
        self.leases[net.id] = tuple(hosts)
        start = read_start_time(child.pid)
        assert start is not None
        pid_file = self.state_dir(net.id) / "dnsmasq.pid"
        return dnsmasq.DnsmasqProcess(child.pid, start, pid_file, net.bridge, child)

    def find_dnsmasq(self, net: NetworkRecord) -> dnsmasq.DnsmasqProcess | None:
        return None

    def dnsmasq_running(self, process: dnsmasq.DnsmasqProcess) -> bool:
        return is_same_live_process(process.pid, process.start_time)

    def write_leases(
        self,
        net: NetworkRecord,
        hosts: Sequence[dnsmasq.DhcpHost],
        process: dnsmasq.DnsmasqProcess | None,
    ) -> None:
        self.calls.append(("write_leases", net.name, len(hosts)))
        self.leases[net.id] = tuple(hosts)

    def tear_down(self, net: NetworkRecord, process: dnsmasq.DnsmasqProcess | None) -> None:
        self.calls.append(("tear_down", net.name))
        self.links.discard(net.bridge)
        if process is not None and process.child is not None:
            process.child.kill()
            process.child.wait()

    def connected_subnets(self) -> list[tuple[str, str]]:
        return list(self.host_subnets)

    def link_exists(self, name: str) -> bool:
        return name in self.links

    def attach(
        self,
        net: NetworkRecord,
        tap: str,
        vm_id: str,
        *,
        uid: int | None = None,
        gid: int | None = None,
    ) -> None:
        self.calls.append(("attach", net.name, tap, net.isolated))
        self.links.add(tap)

    def set_forwards(self, vm_id: str, forwards: Sequence[firewall.PortForward]) -> None:
        self.forwards[vm_id] = list(forwards)

    def detach(self, vm_id: str, tap: str) -> None:
        self.calls.append(("detach", tap))
        self.forwards.pop(vm_id, None)
        self.links.discard(tap)

    def remove_strays(
        self,
        networks: Iterable[NetworkRecord],
        active_vms: Iterable[str],
        dnsmasq_pids: Iterable[int],
    ) -> StrayReport:
        self.calls.append(("remove_strays", sorted(n.name for n in networks), sorted(active_vms)))
        return StrayReport()

    def kill_children(self) -> None:
        for child in self.children:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            child.wait()


@dataclass
class World:
    db: Database
    events: EventBus
    directory: VMDirectory
    driver: FakeDriver
    lifecycle: Lifecycle
    networks: NetworkService
    host: FakeHost
    kernel: Path
    config: NetworkConfig = field(default_factory=NetworkConfig)

    def spec(self, name: str = "web", **fields: Any) -> VMSpec:
        return VMSpec.model_validate(
            {"name": name, "kernel": str(self.kernel), "stop_timeout_s": 0.2, **fields}
        )

    def lease_of(self, vm_id: str) -> str | None:
        return self.networks.address_of(vm_id)


def build(tmp_path: Path, available: bool = True, **config: Any) -> World:
    db = Database(tmp_path / "stoker.db")
    events = EventBus(EventStore(db))
    directory = VMDirectory(VMStore(db), tmp_path)
    driver = FakeDriver(script={"ready_after_s": 0.01})
    cfg = NetworkConfig(dnsmasq_restart_delay_s=0.05, **config)
    host = FakeHost(cfg, tmp_path / "networks")
    availability = Availability(True) if available else Availability(False, "no nft here")
    networks = NetworkService(
        cfg,
        NetworkStore(db),
        directory,
        host,
        availability,
        capabilities_of=lambda spec: QEMU_LIKE,
    )
    lifecycle = Lifecycle(
        directory,
        events,
        {"qemu": driver},
        create_checks=[networks],
        spec_defaults=[networks],
        network=networks,
    )
    events.add_listener(networks.on_event)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel")
    return World(db, events, directory, driver, lifecycle, networks, host, kernel, cfg)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = build(tmp_path)
    yield w
    await w.networks.stop()
    await w.lifecycle.shutdown()
    await w.events.drain()
    w.host.kill_children()
    w.db.close()


async def running(world: World, name: str = "web", **fields: Any) -> str:
    vm = await world.lifecycle.create(world.spec(name, **fields))
    await world.lifecycle.start(vm.id)
    settled = await world.lifecycle.wait_settled(vm.id, 5)
    assert settled.state == S.RUNNING, settled.state_reason
    return vm.id


# --- defaults and checks at create ---------------------------------------------------------


async def test_a_vm_without_a_network_joins_the_default_one_and_holds_an_address(
    world: World,
) -> None:
    vm = await world.lifecycle.create(world.spec())
    assert vm.spec.network.mode == NetworkMode.MANAGED and vm.spec.network.name == "default"
    net = world.networks.view("default")
    assert net.record.subnet == world.config.default_subnet and net.record.managed_by == "config"
    assert [item.lease.vm_id for item in net.leases] == [vm.id]
    first = ipam.plan(world.config.default_subnet).pool_first
    assert world.lease_of(vm.id) == str(first)
    # nothing on the host until a VM on it starts
    assert world.host.calls == []


async def test_an_explicit_network_mode_is_kept(world: World) -> None:
    vm = await world.lifecycle.create(world.spec(network={"mode": "none"}))
    assert vm.spec.network.mode == NetworkMode.NONE
    user = await world.lifecycle.create(world.spec("u", network={"mode": "user"}))
    assert user.spec.network.mode == NetworkMode.USER
    assert world.networks.all() == []


async def test_without_managed_networking_a_vm_gets_user_mode_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    w = build(tmp_path, available=False)
    try:
        vm = await w.lifecycle.create(w.spec(network={"mac": "02:00:00:00:00:09"}))
        assert vm.spec.network.mode == NetworkMode.USER
        assert vm.spec.network.mac == "02:00:00:00:00:09"
        assert "gets user-mode networking" in caplog.text and "no nft here" in caplog.text
        with pytest.raises(InvalidSpec, match="not available on this agent: no nft here"):
            await w.lifecycle.create(w.spec("m", network={"mode": "managed"}))
        status = w.networks.status()
        assert status.default_modes == {"qemu": "user", "firecracker": "user"}
        with pytest.raises(Conflict, match="not available"):
            await w.networks.create(NetworkSpec(name="n", subnet="10.1.0.0/24"))
    finally:
        w.db.close()


async def test_unknown_network_full_pool_and_taken_ports_are_refused(world: World) -> None:
    with pytest.raises(InvalidSpec, match="no network named 'nope'"):
        await world.lifecycle.create(world.spec(network={"mode": "managed", "name": "nope"}))
    await world.networks.create(NetworkSpec(name="tiny", subnet="10.9.0.0/29"))
    for i in range(5):
        await world.lifecycle.create(
            world.spec(f"t{i}", network={"mode": "managed", "name": "tiny"})
        )
    with pytest.raises(Conflict, match="'tiny' has no free address: all 5 addresses"):
        await world.lifecycle.create(world.spec("t5", network={"mode": "managed", "name": "tiny"}))
    assert world.directory.find("t5") is None
    fwd = {"mode": "managed", "port_forwards": [{"host_port": 8080, "guest_port": 80}]}
    await world.lifecycle.create(world.spec("a", network=fwd))
    everywhere = {
        "mode": "managed",
        "port_forwards": [{"host_port": 8080, "guest_port": 80, "host_addr": "0.0.0.0"}],
    }
    with pytest.raises(Conflict, match="8080 is forwarded to VM 'a' already"):
        await world.lifecycle.create(world.spec("b", network=everywhere))


# --- networks as objects ---------------------------------------------------------------------


async def test_bad_networks_are_refused_and_leave_nothing(world: World) -> None:
    with pytest.raises(InvalidSpec, match="not private"):
        await world.networks.create(NetworkSpec(name="pub", subnet="8.8.8.0/24"))
    with pytest.raises(Conflict, match="overlaps host interface eth0"):
        await world.networks.create(NetworkSpec(name="lan", subnet="192.168.0.0/16"))
    await world.networks.create(NetworkSpec(name="one", subnet="10.50.0.0/24"))
    with pytest.raises(Conflict, match="overlaps network 'one'"):
        await world.networks.create(NetworkSpec(name="two", subnet="10.50.0.0/16"))
    with pytest.raises(Conflict, match="exists already"):
        await world.networks.create(NetworkSpec(name="one", subnet="10.51.0.0/24"))
    with pytest.raises(Conflict, match="interface eth0 exists already"):
        await world.networks.create(NetworkSpec(name="br", subnet="10.52.0.0/24", bridge="eth0"))
    with pytest.raises(ValidationError, match="at most 15; choose a shorter name"):
        NetworkSpec(name="long", subnet="10.53.0.0/24", bridge="a-very-long-bridge0")
    world.host.fail_bring_up = "nft: no such table"
    with pytest.raises(Conflict, match=r"could not set up network 'bad'.*nothing was left"):
        await world.networks.create(NetworkSpec(name="bad", subnet="10.54.0.0/24"))
    assert [v.record.name for v in world.networks.all()] == ["one"]
    assert ("tear_down", "bad") in world.host.calls


async def test_a_network_in_use_cannot_be_deleted(world: World) -> None:
    await world.networks.create(NetworkSpec(name="back", subnet="10.60.0.0/24"))
    vm = await world.lifecycle.create(world.spec(network={"mode": "managed", "name": "back"}))
    with pytest.raises(Conflict, match="in use by 1 VM\\(s\\): web; delete them first"):
        await world.networks.delete("back")
    await world.lifecycle.delete(vm.id)
    await world.events.drain()
    await world.networks.delete("back")
    assert ("tear_down", "back") in world.host.calls
    with pytest.raises(NotFound):
        world.networks.view("back")


# --- a VM's NIC from start to delete ----------------------------------------------------------


async def test_start_attaches_stop_detaches_delete_releases(world: World) -> None:
    fwd = {"mode": "managed", "port_forwards": [{"host_port": 8080, "guest_port": 80}]}
    vm_id = await running(world, network=fwd)
    address = world.lease_of(vm_id)
    tap = ipam.tap_name(vm_id)
    boot = world.driver.boots[-1].network
    assert boot is not None and (boot.tap, boot.address, boot.network) == (tap, address, "default")
    assert boot.gateway == str(ipam.gateway(world.config.default_subnet))
    assert ("attach", "default", tap, True) in world.host.calls
    assert [(f.host_port, f.guest_addr, f.guest_port) for f in world.host.forwards[vm_id]] == [
        (8080, address, 80)
    ]
    assert world.networks.view("default").dnsmasq_pid is not None
    await world.lifecycle.stop(vm_id)
    await world.events.drain()
    assert ("detach", tap) in world.host.calls and vm_id not in world.host.forwards
    assert world.lease_of(vm_id) == address  # the address stays with the VM
    await world.lifecycle.start(vm_id)
    await world.lifecycle.wait_settled(vm_id, 5)
    assert world.driver.boots[-1].network == boot  # same TAP, MAC, address
    await world.lifecycle.delete(vm_id, force=True)
    await world.events.drain()
    assert world.networks.view("default").leases == ()
    assert world.host.calls[-2:] == [("detach", tap), ("write_leases", "default", 0)]


async def test_concurrent_starts_get_distinct_addresses_never_reused(world: World) -> None:
    ids = [(await world.lifecycle.create(world.spec(f"vm{i}"))).id for i in range(12)]
    await asyncio.gather(*(world.lifecycle.start(i) for i in ids))
    addresses = {world.lease_of(i) for i in ids}
    assert len(addresses) == 12 and None not in addresses
    for vm_id in ids[:4]:
        await world.lifecycle.delete(vm_id, force=True)
    await world.events.drain()
    again = [(await world.lifecycle.create(world.spec(f"new{i}"))).id for i in range(4)]
    assert not {world.lease_of(i) for i in again} & addresses


async def test_a_stop_event_handled_after_a_new_start_leaves_the_tap(world: World) -> None:
    vm_id = await running(world)
    tap = ipam.tap_name(vm_id)
    # the stopped event's listener gets the lock only after the VM was started again
    await world.lifecycle.stop(vm_id)
    await world.lifecycle.start(vm_id)
    await world.events.drain()
    assert world.lifecycle.get(vm_id).state in (S.STARTING, S.RUNNING)
    assert tap in world.host.links


async def test_an_open_network_attaches_ports_without_isolation(world: World) -> None:
    await world.networks.create(NetworkSpec(name="lab", subnet="10.70.0.0/24", isolation="open"))
    vm_id = await running(world, network={"mode": "managed", "name": "lab"})
    assert ("attach", "lab", ipam.tap_name(vm_id), False) in world.host.calls


# --- agent restart and supervision ------------------------------------------------------------


async def test_reconcile_brings_networks_up_and_replugs_active_vms(world: World) -> None:
    vm_id = await running(world)
    await world.lifecycle.create(world.spec("idle"))
    await world.networks.create(NetworkSpec(name="spare", subnet="10.80.0.0/24"))
    world.host.calls.clear()
    await world.networks.reconcile()
    names = [c for c in world.host.calls if c[0] in ("bring_up", "attach", "remove_strays")]
    assert names == [
        ("bring_up", "default"),
        ("bring_up", "spare"),
        ("attach", "default", ipam.tap_name(vm_id), True),
        ("remove_strays", ["default", "spare"], [vm_id]),
    ]


async def test_a_dead_dnsmasq_is_started_again(world: World) -> None:
    await world.networks.create(NetworkSpec(name="dhcp", subnet="10.90.0.0/24"))
    first = world.networks.view("dhcp").dnsmasq_pid
    assert first is not None
    os.kill(first, signal.SIGKILL)

    async def restarted() -> int:
        while (pid := world.networks.view("dhcp").dnsmasq_pid) in (first, None):
            await asyncio.sleep(0.01)
        assert pid is not None
        return pid

    second = await asyncio.wait_for(restarted(), 5)
    assert second != first and world.networks.view("dhcp").dnsmasq_restarts == 1
    await world.networks.delete("dhcp")
    await asyncio.sleep(0.2)
    assert world.host.calls.count(("start_dnsmasq", "dhcp")) == 2  # not again after delete


# --- pure choices of reconciliation ----------------------------------------------------------


def _link(name: str, owner: str | None = "me") -> LinkInfo:
    alias = link_alias(owner, "x") if owner else None
    return LinkInfo(name=name, index=1, kind=None, master=None, up=True, alias=alias)


def test_stray_links_are_this_agents_own_and_unowned_only() -> None:
    keep_br, stale_br = ipam.bridge_name("n1"), ipam.bridge_name("gone")
    keep_tap, stale_tap = ipam.tap_name("vm1"), ipam.tap_name("vm2")
    others = [_link(ipam.tap_name("theirs"), "other-agent"), _link(ipam.tap_name("x"), None)]
    links = [_link(n) for n in ("eth0", "stk0", keep_br, stale_br, keep_tap, stale_tap)]
    assert stray_links([*links, *others], "me", {keep_br}, {keep_tap}) == [stale_tap, stale_br]


def test_stray_dnsmasq_and_state_dirs(tmp_path: Path) -> None:
    root = tmp_path / "networks"
    (root / "keep").mkdir(parents=True)
    (root / "gone").mkdir()
    ours = dnsmasq.DnsmasqProcess(10, 1, root / "gone" / "dnsmasq.pid", "stkb1")
    kept = dnsmasq.DnsmasqProcess(11, 1, root / "keep" / "dnsmasq.pid", "stkb2")
    foreign = dnsmasq.DnsmasqProcess(12, 1, tmp_path / "other" / "dnsmasq.pid", "br0")
    assert stray_dnsmasq([ours, kept, foreign], root, {11}) == [ours]
    assert stray_state_dirs(root, {"keep"}) == [root / "gone"]
