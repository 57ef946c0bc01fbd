"""Managed networks, the address leases of their VMs, and their DHCP servers' identities.

An address is handed out in one write transaction (read what is taken and the network's
cursor, pick the next free address, insert the lease, move the cursor), so concurrent starts
never get the same address; the UNIQUE constraints say so once more. The cursor is the last
address ever handed out on the network: a released address is given again only after the
pool has wrapped (see :func:`stoker.domain.ipam.allocate`).
"""

from __future__ import annotations

import sqlite3
from datetime import datetime
from ipaddress import IPv4Address

from stoker.domain import ipam
from stoker.domain.networks import DnsmasqRecord, Isolation, Lease, NetworkRecord
from stoker.store.db import Database, from_iso, to_iso

SCHEMA = """
CREATE TABLE networks (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    subnet TEXT NOT NULL,
    gateway TEXT NOT NULL,
    isolation TEXT NOT NULL,
    ipv6_subnet TEXT,
    bridge TEXT NOT NULL UNIQUE,
    uplink TEXT,
    managed_by TEXT NOT NULL,
    created_at TEXT NOT NULL,
    cursor TEXT,
    dnsmasq_pid INTEGER,
    dnsmasq_start_time INTEGER
);
CREATE TABLE network_leases (
    network_id TEXT NOT NULL REFERENCES networks (id),
    vm_id TEXT NOT NULL,
    address TEXT NOT NULL,
    mac TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (network_id, vm_id),
    UNIQUE (network_id, address),
    UNIQUE (network_id, mac)
);
CREATE INDEX network_leases_by_vm ON network_leases (vm_id);
"""


class NetworkTaken(Exception):
    """A network with this name, or this bridge, exists already (the message says which)."""


def _record(row: sqlite3.Row) -> NetworkRecord:
    return NetworkRecord(
        id=row["id"],
        name=row["name"],
        subnet=row["subnet"],
        gateway=row["gateway"],
        isolation=Isolation(row["isolation"]),
        bridge=row["bridge"],
        created_at=from_iso(row["created_at"]),  # type: ignore[arg-type]
        managed_by=row["managed_by"],
        ipv6_subnet=row["ipv6_subnet"],
        uplink=row["uplink"],
    )


def _lease(row: sqlite3.Row) -> Lease:
    return Lease(
        network_id=row["network_id"],
        vm_id=row["vm_id"],
        address=row["address"],
        mac=row["mac"],
        created_at=from_iso(row["created_at"]),  # type: ignore[arg-type]
    )


class NetworkStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # ------------------------------------------------------------------------ networks

    def insert(self, net: NetworkRecord) -> None:
        try:
            with self.db.write() as conn:
                conn.execute(
                    "INSERT INTO networks (id, name, subnet, gateway, isolation, ipv6_subnet,"
                    " bridge, uplink, managed_by, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        net.id,
                        net.name,
                        net.subnet,
                        net.gateway,
                        net.isolation.value,
                        net.ipv6_subnet,
                        net.bridge,
                        net.uplink,
                        net.managed_by,
                        to_iso(net.created_at),
                    ),
                )
        except sqlite3.IntegrityError as exc:
            taken = "bridge" if "bridge" in str(exc) else "name"
            value = net.bridge if taken == "bridge" else net.name
            raise NetworkTaken(f"a network with {taken} {value!r} exists already") from None

    def get(self, ref: str) -> NetworkRecord | None:
        """By name or by id."""
        row = self.db.query_one("SELECT * FROM networks WHERE name = ? OR id = ?", (ref, ref))
        return None if row is None else _record(row)

    def all(self) -> list[NetworkRecord]:
        return [_record(r) for r in self.db.query("SELECT * FROM networks ORDER BY name")]

    def delete(self, network_id: str) -> None:
        """The network and any lease left on it, in one transaction."""
        with self.db.write() as conn:
            conn.execute("DELETE FROM network_leases WHERE network_id = ?", (network_id,))
            conn.execute("DELETE FROM networks WHERE id = ?", (network_id,))

    # -------------------------------------------------------------------------- leases

    def allocate(self, network_id: str, vm_id: str, mac: str, at: datetime) -> Lease:
        """The VM's lease on the network: the one it has, or the next free address.

        Raises :class:`stoker.domain.ipam.PoolFull` (nothing written) when none is free,
        KeyError when the network does not exist.
        """
        with self.db.write() as conn:
            row = conn.execute(
                "SELECT * FROM network_leases WHERE network_id = ? AND vm_id = ?",
                (network_id, vm_id),
            ).fetchone()
            if row is not None:
                return _lease(row)
            net = conn.execute(
                "SELECT subnet, cursor FROM networks WHERE id = ?", (network_id,)
            ).fetchone()
            if net is None:
                raise KeyError(network_id)
            taken = {
                r["address"]
                for r in conn.execute(
                    "SELECT address FROM network_leases WHERE network_id = ?", (network_id,)
                )
            }
            address, cursor = ipam.allocate(net["subnet"], taken, net["cursor"])
            conn.execute(
                "INSERT INTO network_leases (network_id, vm_id, address, mac, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (network_id, vm_id, address, mac, to_iso(at)),
            )
            conn.execute("UPDATE networks SET cursor = ? WHERE id = ?", (cursor, network_id))
        return Lease(network_id, vm_id, address, mac, at)

    def lease(self, network_id: str, vm_id: str) -> Lease | None:
        row = self.db.query_one(
            "SELECT * FROM network_leases WHERE network_id = ? AND vm_id = ?", (network_id, vm_id)
        )
        return None if row is None else _lease(row)

    def leases_of_vm(self, vm_id: str) -> list[Lease]:
        rows = self.db.query("SELECT * FROM network_leases WHERE vm_id = ?", (vm_id,))
        return [_lease(r) for r in rows]

    def leases(self, network_id: str | None = None) -> list[Lease]:
        """A network's leases (or every lease) in address order."""
        if network_id is None:
            rows = self.db.query("SELECT * FROM network_leases")
        else:
            rows = self.db.query("SELECT * FROM network_leases WHERE network_id = ?", (network_id,))
        leases = [_lease(r) for r in rows]
        return sorted(leases, key=lambda lease: (lease.network_id, IPv4Address(lease.address)))

    def count(self, network_id: str) -> int:
        row = self.db.query_one(
            "SELECT COUNT(*) AS n FROM network_leases WHERE network_id = ?", (network_id,)
        )
        return int(row["n"]) if row is not None else 0

    def release(self, vm_id: str) -> list[str]:
        """Drop the VM's leases; returns the ids of the networks it had one on."""
        with self.db.write() as conn:
            rows = conn.execute(
                "SELECT network_id FROM network_leases WHERE vm_id = ?", (vm_id,)
            ).fetchall()
            conn.execute("DELETE FROM network_leases WHERE vm_id = ?", (vm_id,))
        return [r["network_id"] for r in rows]

    def cursor(self, network_id: str) -> str | None:
        row = self.db.query_one("SELECT cursor FROM networks WHERE id = ?", (network_id,))
        return None if row is None else row["cursor"]

    # ------------------------------------------------------------------------- dnsmasq

    def set_dnsmasq(self, network_id: str, pid: int | None, start_time: int | None) -> None:
        with self.db.write() as conn:
            conn.execute(
                "UPDATE networks SET dnsmasq_pid = ?, dnsmasq_start_time = ? WHERE id = ?",
                (pid, start_time, network_id),
            )

    def dnsmasq(self, network_id: str) -> DnsmasqRecord | None:
        row = self.db.query_one(
            "SELECT dnsmasq_pid, dnsmasq_start_time FROM networks WHERE id = ?", (network_id,)
        )
        if row is None or row["dnsmasq_pid"] is None or row["dnsmasq_start_time"] is None:
            return None
        return DnsmasqRecord(network_id, int(row["dnsmasq_pid"]), int(row["dnsmasq_start_time"]))
