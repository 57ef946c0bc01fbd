"""Is etcd down for everyone, or is this node cut off? One probe round answers, per member.

A member is *down* when its client port refuses the TCP connection (nothing listens: the
process is not running), and *leaderless* when it answers Maintenance.Status with no leader.
When every member of the cluster is one or the other during a round, no leader existed at
those moments, so any later leader is elected after the round, and a new etcd leader extends
every lease by its TTL before it may expire one (stoker.cluster.fencing). Anything else (a
timeout, an unreachable network, a member with a leader) proves nothing.

Known limit, written in docs/cluster.md: a firewall that *rejects* (TCP reset or ICMP
port-unreachable) on behalf of a running member looks like a member that is down. Partitions
that drop packets, or an unplugged link, are told apart correctly. ``hold_when_etcd_down =
false`` turns the hold off.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urlsplit

import grpc
import grpc.aio
from etcd3aio._protobuf import MaintenanceStub, StatusRequest  # generated protos, pinned


class MemberState(StrEnum):
    DOWN = "down"
    LEADERLESS = "leaderless"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Endpoint | None:
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            return None
        if not parts.hostname or port is None:
            return None
        return cls(parts.hostname, port)


async def probe_member(endpoint: Endpoint, timeout: float) -> MemberState:
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
    except ConnectionRefusedError:
        return MemberState.DOWN
    except (OSError, TimeoutError):
        return MemberState.UNKNOWN
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    channel = grpc.aio.insecure_channel(f"{endpoint.host}:{endpoint.port}")
    try:
        status = await MaintenanceStub(channel).Status(StatusRequest(), timeout=timeout)
    except grpc.aio.AioRpcError:
        return MemberState.UNKNOWN
    finally:
        await channel.close()
    return MemberState.LEADERLESS if int(status.leader) == 0 else MemberState.UNKNOWN


async def etcd_down_everywhere(
    members: Sequence[Sequence[str]], timeout: float = 0.25
) -> tuple[bool, list[MemberState]]:
    """Probe every member (each a list of its client URLs; one URL that answers decides).
    True only when every member is down or leaderless."""
    if not members:
        return False, []

    async def one(urls: Sequence[str]) -> MemberState:
        endpoints = [e for e in (Endpoint.parse(u) for u in urls) if e is not None]
        if not endpoints:
            return MemberState.UNKNOWN
        states = await asyncio.gather(*(probe_member(e, timeout) for e in endpoints))
        # a member listening on any of its URLs is running; it counts as down only when all
        # of them refuse
        if all(s == MemberState.DOWN for s in states):
            return MemberState.DOWN
        if any(s == MemberState.UNKNOWN for s in states):
            return MemberState.UNKNOWN
        return MemberState.LEADERLESS

    states = list(await asyncio.gather(*(one(urls) for urls in members)))
    return all(s != MemberState.UNKNOWN for s in states), states
