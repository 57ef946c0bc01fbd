"""Every node's mirror of the cluster state: one consistent read of ``/stoker/``, then one
watch from the revision after it, so the scheduler and the reconciler decide on a snapshot
that is never older than the watch delay and never torn between two revisions.

When etcd is unreachable the mirror simply stops moving (the facade's watch resumes by
itself); decisions made on it are the decisions of that revision, and every write they lead
to is a transaction that fails if the revision moved on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TypeVar

from stoker.cluster import keys
from stoker.cluster.etcd import Etcd, EtcdError, KeyValue, RevisionCompacted
from stoker.cluster.records import Record, load
from stoker.services.loops import cancel

log = logging.getLogger("stoker.cluster")

R = TypeVar("R", bound=Record)
_PAGE = 1000


class ClusterView:
    def __init__(self, etcd: Etcd, root: str = keys.ROOT) -> None:
        self.etcd = etcd
        self.root = root
        self.revision = 0
        #: bumped on every applied change; waiters compare it
        self.version = 0
        #: prefix ("/stoker/vms/") -> name -> key-value
        self._kvs: dict[str, dict[str, KeyValue]] = {}
        self._parsed: dict[str, tuple[int, Record | None]] = {}
        self._changed = asyncio.Condition()
        self.synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- running -------------------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cluster view")

    async def stop(self) -> None:
        await cancel(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self._load()
                async for event in self.etcd.watch(self.root, start_revision=self.revision + 1):
                    prefix, name = _split(event.key)
                    if event.kind == "put":
                        self._kvs.setdefault(prefix, {})[name] = event.kv
                    else:
                        self._kvs.get(prefix, {}).pop(name, None)
                        self._parsed.pop(event.key, None)
                    self.revision = event.revision
                    await self._bump()
            except RevisionCompacted as exc:
                log.info("cluster view: %s; reading everything again", exc)
            except EtcdError as exc:
                log.info("cluster view: %s; retrying", exc)
                await asyncio.sleep(0.5)

    async def _load(self) -> None:
        """Every key under the root at one revision, in pages."""
        kvs: dict[str, dict[str, KeyValue]] = {}
        start: str | None = None
        revision = 0
        while True:
            page = await self.etcd.range(self.root, limit=_PAGE, start=start, revision=revision)
            revision = page.revision
            for kv in page.items:
                prefix, name = _split(kv.key)
                kvs.setdefault(prefix, {})[name] = kv
            start = page.next_start
            if start is None:
                break
        self._kvs = kvs
        self._parsed = {}
        self.revision = revision
        self.synced.set()
        await self._bump()

    async def _bump(self) -> None:
        self.version += 1
        async with self._changed:
            self._changed.notify_all()

    async def wait_changed(self, since: int, timeout: float) -> int:
        """Wait until ``version`` moves past ``since`` (or the timeout); returns it."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: self.version != since)
        return self.version

    # -- reading -------------------------------------------------------------------------------

    def get(self, key: str) -> KeyValue | None:
        prefix, name = _split(key)
        return self._kvs.get(prefix, {}).get(name)

    def record(self, key: str, model: type[R]) -> R | None:
        kv = self.get(key)
        if kv is None:
            return None
        cached = self._parsed.get(key)
        if cached is None or cached[0] != kv.mod_revision:
            cached = (kv.mod_revision, load(model, kv.value, key))
            self._parsed[key] = cached
        parsed = cached[1]
        return parsed if isinstance(parsed, model) else None

    def names(self, prefix: str) -> list[str]:
        """Names directly under ``prefix`` (``keys.VMS`` ...), sorted."""
        return sorted(self._kvs.get(prefix, {}))

    def records(self, prefix: str, model: type[R]) -> dict[str, tuple[KeyValue, R]]:
        """Every well-formed record directly under ``prefix``, by name."""
        out: dict[str, tuple[KeyValue, R]] = {}
        for name, kv in self._kvs.get(prefix, {}).items():
            parsed = self.record(prefix + name, model)
            if parsed is not None:
                out[name] = (kv, parsed)
        return out


def _split(key: str) -> tuple[str, str]:
    prefix, _, name = key.rpartition("/")
    return prefix + "/", name
