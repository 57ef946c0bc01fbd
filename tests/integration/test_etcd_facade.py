"""The etcd facade against a real 3-member etcd 3.4 cluster on loopback.

Leases use TTL 1-2 s and raft runs with a 500 ms election timeout (tests/etcd_cluster.py), so
the whole module takes about 20 s, most of it waiting for leases to expire on purpose.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from stoker.cluster import (
    Election,
    Etcd,
    EtcdUnavailable,
    LeaseKeeper,
    LeaseNotFound,
    LeaseState,
    Put,
    RevisionCompacted,
    WatchEvent,
)
from stoker.cluster.election import observe
from tests.etcd_cluster import MISSING, EtcdCluster, etcd_available
from tests.helpers import free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not etcd_available(), reason=MISSING),
]


@pytest.fixture(scope="module")
def cluster() -> Iterator[EtcdCluster]:
    with EtcdCluster(size=3) as running:
        yield running


@pytest.fixture
def healthy(cluster: EtcdCluster) -> Iterator[EtcdCluster]:
    """The cluster, given back whole: members a test killed or paused are brought back."""
    try:
        yield cluster
    finally:
        for member in cluster.members:
            if member.running:
                cluster.resume(member.name)
            else:
                cluster.restart(member.name)
        cluster.wait_healthy()


@pytest.fixture
async def etcd(cluster: EtcdCluster) -> AsyncIterator[Etcd]:
    async with Etcd(cluster.client_urls, timeout=3) as client:
        yield client


@pytest.fixture
def prefix() -> str:
    return f"/t/{uuid.uuid4().hex[:8]}/"


async def test_concurrent_creates_have_exactly_one_winner(
    cluster: EtcdCluster, etcd: Etcd, prefix: str
) -> None:
    # a second client on another member, so the two creators really race through raft
    async with Etcd(cluster.client_urls[1:], timeout=3) as other:
        for i in range(20):
            key = f"{prefix}vm-{i}"
            a, b = await asyncio.gather(etcd.create(key, b"node-a"), other.create(key, b"node-b"))
            assert a.succeeded != b.succeeded, (a, b)
            winner, loser = (a, b) if a.succeeded else (b, a)
            stored = await etcd.get(key)
            assert stored is not None
            assert stored.create_revision == winner.revision
            assert loser.got[key] == stored  # the loser is told who won


async def test_compare_and_swap_on_mod_revision(etcd: Etcd, prefix: str) -> None:
    key = prefix + "record"
    first = await etcd.put(key, b"v1")
    current = await etcd.get(key)
    assert current is not None and current.mod_revision == first
    await etcd.put(key, b"v2")  # someone else writes meanwhile

    stale = await etcd.replace(key, b"mine", mod_revision=first)
    assert not stale.succeeded
    assert stale.got[key] is not None and stale.got[key].value == b"v2"  # type: ignore[union-attr]

    fresh = await etcd.replace(key, b"mine", mod_revision=stale.got[key].mod_revision)  # type: ignore[union-attr]
    assert fresh.succeeded
    assert not (await etcd.delete_if(key, mod_revision=first)).succeeded
    assert (await etcd.delete_if(key, mod_revision=fresh.revision)).succeeded
    assert await etcd.get(key) is None


async def test_range_pages_walk_one_snapshot(etcd: Etcd, prefix: str) -> None:
    await asyncio.gather(*(etcd.put(f"{prefix}{i:04d}", b"x") for i in range(1_200)))
    first = await etcd.range(prefix, limit=500)
    await etcd.put(prefix + "0000a", b"written after the first page")
    seen, page = list(first.items), first
    while page.next_start is not None:
        page = await etcd.range(prefix, limit=500, start=page.next_start, revision=first.revision)
        seen.extend(page.items)
    assert [kv.key for kv in seen] == [f"{prefix}{i:04d}" for i in range(1_200)]
    assert first.remaining == 1_200 and len(first.items) == 500 and first.more


async def test_lease_expiry_removes_its_keys(etcd: Etcd, prefix: str) -> None:
    lease = await etcd.grant(1)
    await etcd.put(prefix + "alive", b"node-a", lease=lease.id)
    began = time.monotonic()
    while await etcd.get(prefix + "alive") is not None:
        assert time.monotonic() - began < 4, "a key bound to a 1 s lease outlived it"
        await asyncio.sleep(0.05)
    with pytest.raises(LeaseNotFound):
        await etcd.renew(lease.id)
    with pytest.raises(LeaseNotFound):
        await etcd.put(prefix + "late", b"x", lease=lease.id)


async def test_keeper_holds_a_lease_and_revokes_it(etcd: Etcd, prefix: str) -> None:
    keeper = await LeaseKeeper.grant(etcd, 1)
    await etcd.put(prefix + "alive", b"node-a", lease=keeper.lease.id)
    async with keeper:
        await asyncio.sleep(2.5)  # more than twice the TTL
        assert keeper.state == LeaseState.ALIVE and not keeper.expired.is_set()
        assert await etcd.get(prefix + "alive") is not None
        await keeper.stop(revoke=True)
    assert keeper.expired.is_set()
    assert await etcd.get(prefix + "alive") is None


async def test_keepalive_loss_is_reported_within_the_ttl(healthy: EtcdCluster, prefix: str) -> None:
    """The node talks to one member; that member dies and no other is reachable."""
    ttl = 2
    only = healthy.members[0]
    changes: list[tuple[LeaseState, float]] = []
    async with Etcd([only.client_url], timeout=1) as lonely:
        keeper = await LeaseKeeper.grant(
            lonely, ttl, on_change=lambda s, _k: changes.append((s, time.monotonic()))
        )
        async with keeper:
            await asyncio.sleep(1.0)
            assert keeper.state == LeaseState.ALIVE
            healthy.kill(only.name)
            killed = time.monotonic()
            deadline = keeper.expires_at
            assert deadline - killed <= ttl
            await asyncio.wait_for(keeper.expired.wait(), timeout=ttl + 1)
    states = [s for s, _t in changes]
    assert states == [LeaseState.AT_RISK, LeaseState.EXPIRED], changes
    at_risk, expired = (t for _s, t in changes)
    # renewals run every TTL/3: the first failure shows within about that, long before expiry
    assert at_risk - killed < ttl / 3 + 0.5, at_risk - killed
    # 'expired' is said no later than the moment the lease may really be gone
    assert expired <= deadline + 0.15, (expired, deadline)


async def test_watch_resumes_across_a_leader_kill(
    healthy: EtcdCluster, etcd: Etcd, prefix: str
) -> None:
    seen: list[WatchEvent] = []
    start = await etcd.revision()

    async def follow() -> None:
        async for event in etcd.watch(prefix, start_revision=start + 1):
            seen.append(event)

    watcher = asyncio.create_task(follow())
    try:
        await _until(lambda: _serving_member(healthy) is not None, 5, "the watch to land")
        serving = _serving_member(healthy)
        assert serving is not None
        healthy.move_leader(serving)  # the member holding our watch stream is the leader

        async with Etcd(healthy.client_urls, timeout=1) as writer:
            for i in range(40):
                if i == 15:
                    healthy.kill(serving)
                await _create_until_done(writer, f"{prefix}{i:03d}")
                await asyncio.sleep(0.02)
        await _until(lambda: len(seen) >= 40, 10, "every event after the leader died")
    finally:
        watcher.cancel()
    assert [e.key for e in seen] == [f"{prefix}{i:03d}" for i in range(40)]
    assert all(e.kind == "put" for e in seen)
    revisions = [e.revision for e in seen]
    assert revisions == sorted(set(revisions))


async def test_watch_from_compacted_history_says_so(
    healthy: EtcdCluster, etcd: Etcd, prefix: str
) -> None:
    old = await etcd.put(prefix + "a", b"1")
    latest = await etcd.put(prefix + "a", b"2")
    healthy.compact(latest)
    with pytest.raises(RevisionCompacted) as caught:
        async for _event in etcd.watch(prefix, start_revision=old):
            pass
    assert caught.value.compact_revision == latest
    assert "re-read the range" in str(caught.value)


async def test_election_hands_over_when_the_leaders_lease_expires(
    cluster: EtcdCluster, prefix: str
) -> None:
    async with Etcd(cluster.client_urls, timeout=2) as a, Etcd(cluster.client_urls) as b:
        keeper_a = await LeaseKeeper.grant(a, 1)
        keeper_b = await LeaseKeeper.grant(b, 1)
        async with keeper_a, keeper_b:
            first = Election(a, prefix, keeper_a.lease.id)
            second = Election(b, prefix, keeper_b.lease.id)
            assert (await first.campaign(b"node-a")).value == b"node-a"

            observed: list[bytes | None] = []

            async def follow_leader() -> None:
                async for now in observe(b, prefix):
                    observed.append(now.value if now else None)

            observer = asyncio.create_task(follow_leader())
            waiting = asyncio.create_task(second.campaign(b"node-b"))
            await asyncio.sleep(1.5)
            assert not waiting.done(), "two leaders at once"
            fenced = await a.txn([first.leadership()], [Put(prefix + "state", b"by a")])
            assert fenced.succeeded

            await keeper_a.stop()  # node A dies: it stops renewing
            stopped = time.monotonic()
            leader = await asyncio.wait_for(waiting, timeout=4)
            handover = time.monotonic() - stopped
            assert leader.value == b"node-b"
            assert handover < keeper_a.lease.ttl + 1.5, handover

            late = await a.txn([first.leadership()], [Put(prefix + "state", b"stale a")])
            assert not late.succeeded  # the old leader's writes are fenced off
            assert (await b.txn([second.leadership()], [Put(prefix + "state", b"by b")])).succeeded
            await _until(lambda: observed[-1:] == [b"node-b"], 3, "observers to see node-b")
            observer.cancel()
            assert observed == [b"node-a", b"node-b"]


async def test_resign_hands_over_at_once(etcd: Etcd, prefix: str) -> None:
    keeper_a = await LeaseKeeper.grant(etcd, 5)
    keeper_b = await LeaseKeeper.grant(etcd, 5)
    async with keeper_a, keeper_b:
        first = Election(etcd, prefix, keeper_a.lease.id)
        second = Election(etcd, prefix, keeper_b.lease.id)
        await first.campaign(b"a")
        waiting = asyncio.create_task(second.campaign(b"b"))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        await first.resign()
        assert (await asyncio.wait_for(waiting, timeout=2)).value == b"b"
        assert (await first.leader()) is not None
        await keeper_a.stop(revoke=True)
        await keeper_b.stop(revoke=True)


async def test_unreachable_etcd_is_named_quickly() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    async with Etcd([url], timeout=0.5) as nowhere:
        began = time.monotonic()
        with pytest.raises(EtcdUnavailable) as caught:
            await nowhere.get("/stoker/vms/web")
    assert time.monotonic() - began < 1.0
    assert f"etcd unreachable at {url}" in str(caught.value)


# -- helpers -----------------------------------------------------------------------------------


def _serving_member(cluster: EtcdCluster) -> str | None:
    serving = [m.name for m in cluster.members if m.running and cluster.watchers(m.name)]
    return serving[0] if len(serving) == 1 else None


async def _create_until_done(etcd: Etcd, key: str) -> None:
    """Create ``key`` through a leader election: retry until it exists (it may already)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            await etcd.create(key, b"x")
            return
        except EtcdUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def _until(check: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout} s for {what}")
        await asyncio.sleep(0.02)
