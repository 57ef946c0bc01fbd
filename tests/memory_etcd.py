"""An in-memory stand-in for etcd, for unit tests of cluster code that reads through a
``ClusterView`` and writes transactions: keys with create and mod revisions, create-if-absent
and compare-on-revision transactions, and a watch. The real thing is in the integration tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

from stoker.cluster.etcd import (
    Condition,
    Delete,
    EtcdUnavailable,
    Get,
    KeyValue,
    Op,
    Page,
    Put,
    TxnResult,
    WatchEvent,
)


class MemoryEtcd:
    """Keys, revisions, create-if-absent and compare-on-revision transactions, and a watch:
    what the operations and the view use of etcd."""

    def __init__(self) -> None:
        self.kvs: dict[str, KeyValue] = {}
        self.revision = 1
        self.down = False
        self.watchers: list[asyncio.Queue[WatchEvent]] = []

    def _check(self) -> None:
        if self.down:
            raise EtcdUnavailable(["http://10.0.0.1:2379"], "no answer within 2 s")

    def _apply(self, op: Op, got: dict[str, KeyValue | None]) -> None:
        if isinstance(op, Get):
            got[op.key] = self.kvs.get(op.key)
            return
        self.revision += 1
        if isinstance(op, Put):
            old = self.kvs.get(op.key)
            created = old.create_revision if old else self.revision
            kv = KeyValue(op.key, op.value, created, self.revision, 1, op.lease)
            self.kvs[op.key] = kv
            event = WatchEvent("put", kv)
        else:
            self.kvs.pop(op.key, None)
            event = WatchEvent("delete", KeyValue(op.key, b"", 0, self.revision, 0, 0))
        for queue in self.watchers:
            queue.put_nowait(event)

    def _holds(self, c: Condition) -> bool:
        kv = self.kvs.get(c.key)
        have = {"create": kv.create_revision if kv else 0, "mod": kv.mod_revision if kv else 0}
        assert c.op == "==" or c.op == ">", c
        value = have[c.target]
        return value == c.value if c.op == "==" else value > int(c.value)  # type: ignore[operator]

    async def txn(
        self,
        when: Sequence[Condition],
        then: Sequence[Op],
        otherwise: Sequence[Op] = (),
        *,
        timeout: float | None = None,
    ) -> TxnResult:
        self._check()
        ok = all(self._holds(c) for c in when)
        got: dict[str, KeyValue | None] = {}
        for op in then if ok else otherwise:
            self._apply(op, got)
        return TxnResult(ok, self.revision, got)

    async def create(self, key: str, value: bytes, **_: Any) -> TxnResult:
        return await self.txn([Condition(key, "create", "==", 0)], [Put(key, value)], [Get(key)])

    async def put(self, key: str, value: bytes, **_: Any) -> int:
        await self.txn([], [Put(key, value)])
        return self.revision

    async def delete_key(self, key: str) -> None:
        await self.txn([], [Delete(key)])

    async def range(self, prefix: str, **_: Any) -> Page:
        self._check()
        items = tuple(kv for key, kv in sorted(self.kvs.items()) if key.startswith(prefix))
        return Page(items, self.revision, False, len(items))

    async def watch(self, key: str, **_: Any) -> AsyncIterator[WatchEvent]:
        queue: asyncio.Queue[WatchEvent] = asyncio.Queue()
        self.watchers.append(queue)
        while True:
            yield await queue.get()
