"""The network store: records, and addresses handed out once, in one transaction each."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from stoker.domain import ipam
from stoker.domain.networks import Isolation, NetworkRecord
from stoker.store.db import Database
from stoker.store.networks import NetworkStore, NetworkTaken

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def record(name: str = "default", subnet: str = "10.213.0.0/24", **fields: str) -> NetworkRecord:
    values = {
        "id": f"id-{name}",
        "name": name,
        "subnet": subnet,
        "gateway": str(ipam.gateway(subnet)),
        "isolation": Isolation.ISOLATED,
        "bridge": ipam.bridge_name(f"id-{name}"),
        "created_at": NOW,
        "managed_by": "api",
        **fields,
    }
    return NetworkRecord(**values)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> NetworkStore:
    return NetworkStore(Database(tmp_path / "stoker.db"))


def test_records_round_trip_and_names_and_bridges_are_unique(store: NetworkStore) -> None:
    net = record()
    store.insert(net)
    assert store.get("default") == net and store.get(net.id) == net
    with pytest.raises(NetworkTaken, match="name 'default'"):
        store.insert(record(id="other", bridge="br-other"))  # type: ignore[arg-type]
    with pytest.raises(NetworkTaken, match="bridge"):
        store.insert(record("two", "10.1.0.0/24", bridge=net.bridge))
    store.set_dnsmasq(net.id, 1234, 99)
    dns = store.dnsmasq(net.id)
    assert dns is not None and (dns.pid, dns.start_time) == (1234, 99)


def test_a_vm_keeps_its_lease_and_addresses_move_on_after_release(store: NetworkStore) -> None:
    net = record()
    store.insert(net)
    first = store.allocate(net.id, "vm-a", "02:00:00:00:00:0a", NOW)
    assert first.address == "10.213.0.2"
    assert store.allocate(net.id, "vm-a", "02:00:00:00:00:0a", NOW).address == "10.213.0.2"
    second = store.allocate(net.id, "vm-b", "02:00:00:00:00:0b", NOW)
    assert second.address == "10.213.0.3"
    assert store.release("vm-a") == [net.id]
    third = store.allocate(net.id, "vm-c", "02:00:00:00:00:0c", NOW)
    assert third.address == "10.213.0.4"  # not the released .2
    assert [lease.vm_id for lease in store.leases(net.id)] == ["vm-b", "vm-c"]
    assert store.cursor(net.id) == "10.213.0.4"


def test_a_full_pool_writes_nothing(store: NetworkStore) -> None:
    net = record("tiny", "10.9.0.0/29")
    store.insert(net)
    for i in range(5):
        store.allocate(net.id, f"vm{i}", f"02:00:00:00:00:{i:02x}", NOW)
    with pytest.raises(ipam.PoolFull, match="all 5 are taken"):
        store.allocate(net.id, "vm5", "02:00:00:00:00:05", NOW)
    assert store.count(net.id) == 5


def test_concurrent_allocations_never_share_an_address(store: NetworkStore) -> None:
    net = record()
    store.insert(net)
    got: list[str] = []

    def take(i: int) -> None:
        got.append(store.allocate(net.id, f"vm{i}", f"02:00:00:00:01:{i:02x}", NOW).address)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(got) == len(set(got)) == 40


def test_deleting_a_network_drops_its_leases(store: NetworkStore) -> None:
    net = record()
    store.insert(net)
    store.allocate(net.id, "vm-a", "02:00:00:00:00:0a", NOW)
    store.delete(net.id)
    assert store.get(net.id) is None and store.leases() == []
