"""Leader election, etcd's recipe (the one its Go ``concurrency.Election`` implements).

Each candidate puts a key ``<prefix><lease id>`` bound to its own lease, created only if
absent. The candidate whose key has the lowest create_revision leads; every other one waits
for the deletion of the candidates created before it. A leader that dies stops renewing, its
lease expires, etcd deletes its key, and the next candidate leads: no clock in the protocol,
only etcd's revisions. While leading, writes are fenced with ``leadership()``, a condition
that fails as soon as the key is gone, so a leader that lost its lease cannot write.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from stoker.cluster.etcd import (
    Condition,
    Delete,
    Etcd,
    EtcdError,
    KeyValue,
    LeaseNotFound,
    Put,
    same_incarnation,
)


@dataclass(frozen=True, slots=True)
class Leader:
    key: str
    value: bytes
    create_revision: int
    lease: int


def _leader(candidates: dict[str, KeyValue]) -> Leader | None:
    if not candidates:
        return None
    kv = min(candidates.values(), key=lambda c: c.create_revision)
    return Leader(kv.key, kv.value, kv.create_revision, kv.lease)


class NotLeader(EtcdError):
    """This candidate is not (or no longer) the leader."""


class Election:
    """One candidate in the election under ``prefix`` (a key prefix ending in '/'), bound to
    ``lease_id``: the node's lease, so losing the node means losing the leadership."""

    def __init__(self, etcd: Etcd, prefix: str, lease_id: int) -> None:
        if not prefix.endswith("/"):
            raise ValueError(f"an election prefix must end with '/', got {prefix!r}")
        self.etcd = etcd
        self.prefix = prefix
        self.lease_id = lease_id
        self.key = f"{prefix}{lease_id:x}"
        self._revision = 0

    @property
    def create_revision(self) -> int:
        """Revision at which this candidate's key was created; 0 before campaign()."""
        return self._revision

    async def campaign(self, value: bytes) -> Leader:
        """Become a candidate and wait until this candidate leads. Cancel to give up (the
        key stays until resign() or the lease ends). LeaseNotFound when the lease expires
        while waiting."""
        result = await self.etcd.create(self.key, value, lease=self.lease_id)
        if result.succeeded:
            self._revision = result.revision
        else:
            mine = result.got[self.key]
            assert mine is not None  # the create failed, so the key exists
            self._revision = mine.create_revision
            if mine.value != value:
                await self.proclaim(value)
        await self._wait_for_predecessors()
        return Leader(self.key, value, self._revision, self.lease_id)

    async def _wait_for_predecessors(self) -> None:
        page = await self.etcd.range(self.prefix)
        candidates = {kv.key: kv for kv in page.items}
        if self.key not in candidates:
            raise LeaseNotFound(self.lease_id)
        if not self._older(candidates):
            return
        async for event in self.etcd.watch(self.prefix, start_revision=page.revision + 1):
            if event.kind == "put":
                candidates[event.key] = event.kv
                continue
            candidates.pop(event.key, None)
            if event.key == self.key:
                raise LeaseNotFound(self.lease_id)
            if not self._older(candidates):
                return

    def _older(self, candidates: dict[str, KeyValue]) -> bool:
        return any(kv.create_revision < self._revision for kv in candidates.values())

    def leadership(self) -> Condition:
        """Add to a transaction to write only while this candidate's key is the one it
        created (so still bound to a live lease). The caller must have won campaign()."""
        if not self._revision:
            raise NotLeader("campaign() first: this candidate has no key yet")
        return same_incarnation(self.key, self._revision)

    async def proclaim(self, value: bytes) -> None:
        """Change the value this candidate publishes (for example its address)."""
        result = await self.etcd.txn([self.leadership()], [Put(self.key, value, self.lease_id)])
        if not result.succeeded:
            raise NotLeader(f"election key {self.key} is gone: the lease has expired")

    async def resign(self) -> None:
        """Withdraw: delete this candidate's key if it is still ours (the next one leads)."""
        if self._revision:
            await self.etcd.txn([self.leadership()], [Delete(self.key)])
            self._revision = 0

    async def leader(self) -> Leader | None:
        return await leader(self.etcd, self.prefix)

    def observe(self) -> AsyncIterator[Leader | None]:
        return observe(self.etcd, self.prefix)


async def leader(etcd: Etcd, prefix: str) -> Leader | None:
    """The current leader of the election under ``prefix`` (None: no candidate)."""
    page = await etcd.range(prefix)
    return _leader({kv.key: kv for kv in page.items})


async def observe(etcd: Etcd, prefix: str) -> AsyncIterator[Leader | None]:
    """The current leader (None: nobody), then each change of leader or of its value, as it
    happens; needs no candidacy, so any node can follow who schedules."""
    page = await etcd.range(prefix)
    candidates = {kv.key: kv for kv in page.items}
    current = _leader(candidates)
    yield current
    async for event in etcd.watch(prefix, start_revision=page.revision + 1):
        if event.kind == "put":
            candidates[event.key] = event.kv
        else:
            candidates.pop(event.key, None)
        now = _leader(candidates)
        if now != current:
            current = now
            yield current
