"""A small typed asyncio facade over etcd v3: keys, ranges, transactions, leases, watches.

Built on ``etcd3aio`` (grpc.aio; why in docs/cluster.md) for the gRPC channel with
round-robin over every member, the generated etcd protos and unary calls with deadlines. The
facade owns what the cluster logic must be able to trust and the library gets wrong or leaves
out: watches that resume from the revision after the last event they delivered (the library
resumes from a response header, which skips events during a catch-up), a single lease renewal
with a deadline (its keep-alive helper swallows failures), and errors that say which etcd was
unreachable. Only this module imports etcd3aio.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import grpc
import grpc.aio
from etcd3aio import EtcdConnectionError, EtcdTransientError
from etcd3aio._protobuf import (  # generated etcd protos; etcd3aio is pinned exactly for this
    Compare as _Compare,
)
from etcd3aio._protobuf import (
    DeleteRangeRequest,
    PutRequest,
    RangeRequest,
    RequestOp,
    WatchCreateRequest,
    WatchRequest,
    WatchStub,
)
from etcd3aio.cluster import ClusterService
from etcd3aio.connections import ConnectionManager
from etcd3aio.kv import KVService, prefix_range_end
from etcd3aio.lease import LeaseService

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TIMEOUT = 2.0
# gRPC keep-alive pings find a silently dead member for watches. etcd refuses pings more
# often than --grpc-keepalive-min-time (5 s by default) with GOAWAY, so stay above it.
_PING_EVERY_MS = 6_000
_PING_TIMEOUT_MS = 2_000
# etcd cancels the watch streams of a member that has lost its leader when asked to: a
# partitioned member then hands the watch back to us instead of going silent.
_REQUIRE_LEADER = (("hasleader", "true"),)
_WATCH_BACKOFF = (0.05, 1.0)
# gRPC backs off reconnecting to a member up to 120 s by default; after an etcd outage that
# would keep a node from renewing its lease long after etcd is back, so cap it
_RECONNECT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
)


# -- errors ------------------------------------------------------------------------------------


class EtcdError(Exception):
    """Anything etcd refused or could not do."""


class EtcdUnavailable(EtcdError):
    """No member answered in time: the cluster is down, partitioned away or the URLs are wrong."""

    def __init__(self, urls: Sequence[str], detail: str) -> None:
        self.urls = tuple(urls)
        super().__init__(
            f"etcd unreachable at {','.join(urls)}: {detail} "
            "(is etcd running, and does --cluster list its client URLs?)"
        )


class LeaseNotFound(EtcdError):
    """The lease is gone (expired or revoked): keys bound to it have been deleted."""

    def __init__(self, lease_id: int) -> None:
        self.lease_id = lease_id
        super().__init__(f"etcd lease {lease_id:x} has expired or was revoked")


class RevisionCompacted(EtcdError):
    """The history needed (a watch start, a paged read) was compacted away: read the range
    again and watch from that read's revision + 1."""

    def __init__(self, requested: int, compact_revision: int) -> None:
        self.requested = requested
        self.compact_revision = compact_revision
        super().__init__(
            f"etcd history before revision {compact_revision} was compacted; "
            f"revision {requested} is gone: re-read the range and watch from its revision + 1"
        )


# -- results -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key as etcd stores it; the revisions are what compare-and-swap works on."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


@dataclass(frozen=True, slots=True)
class Page:
    """Part of a range, read at one store revision.

    Pass ``revision`` back for the following pages to see one consistent snapshot, and watch
    from ``revision + 1`` to follow changes after it without a gap.
    """

    items: tuple[KeyValue, ...]
    revision: int
    more: bool
    #: keys from the page's start to the end of the range (this page included)
    remaining: int

    @property
    def next_start(self) -> str | None:
        """The ``start`` for the next page, or None when this is the last one."""
        return self.items[-1].key + "\x00" if self.more and self.items else None


@dataclass(frozen=True, slots=True)
class Lease:
    id: int
    #: seconds etcd granted (at least its minimum, 1.5 x the election timeout rounded up)
    ttl: int


@dataclass(frozen=True, slots=True)
class Member:
    """One etcd cluster member as the cluster lists it."""

    id: int
    name: str
    client_urls: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class WatchEvent:
    kind: Literal["put", "delete"]
    #: for a delete: the key with an empty value and the deletion's revision
    kv: KeyValue

    @property
    def key(self) -> str:
        return self.kv.key

    @property
    def revision(self) -> int:
        return self.kv.mod_revision


# -- transactions ------------------------------------------------------------------------------

Target = Literal["create", "mod", "version", "value", "lease"]
Operator = Literal["==", "!=", "<", ">"]

_TARGETS: dict[str, tuple[int, str]] = {
    "create": (_Compare.CREATE, "create_revision"),
    "mod": (_Compare.MOD, "mod_revision"),
    "version": (_Compare.VERSION, "version"),
    "value": (_Compare.VALUE, "value"),
    "lease": (_Compare.LEASE, "lease"),
}
_OPERATORS: dict[str, int] = {
    "==": _Compare.EQUAL,
    "!=": _Compare.NOT_EQUAL,
    "<": _Compare.LESS,
    ">": _Compare.GREATER,
}


@dataclass(frozen=True, slots=True)
class Condition:
    """One comparison of a transaction, e.g. ``Condition(key, "mod", "==", 42)``."""

    key: str
    target: Target
    op: Operator
    value: int | bytes

    def _proto(self) -> Any:
        target, field = _TARGETS[self.target]
        return _Compare(
            key=self.key.encode(),
            target=target,
            result=_OPERATORS[self.op],
            **{field: self.value},
        )


def absent(key: str) -> Condition:
    """True when the key does not exist (etcd's create-if-absent idiom)."""
    return Condition(key, "create", "==", 0)


def unchanged(key: str, mod_revision: int) -> Condition:
    """True when nobody wrote the key since it was read at ``mod_revision``."""
    return Condition(key, "mod", "==", mod_revision)


def same_incarnation(key: str, create_revision: int) -> Condition:
    """True while the key is the one created at ``create_revision`` (not deleted and
    recreated): how a leader fences its writes on its own election key."""
    return Condition(key, "create", "==", create_revision)


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    key: str


@dataclass(frozen=True, slots=True)
class Get:
    key: str


Op = Put | Delete | Get


def _op_proto(op: Op) -> Any:
    if isinstance(op, Put):
        return RequestOp(
            request_put=PutRequest(key=op.key.encode(), value=op.value, lease=op.lease)
        )
    if isinstance(op, Delete):
        return RequestOp(request_delete_range=DeleteRangeRequest(key=op.key.encode()))
    return RequestOp(request_range=RangeRequest(key=op.key.encode()))


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    #: the store revision after the transaction (the create/mod revision of what it wrote)
    revision: int
    #: the value of every key named by a Get in the branch that ran (None: key absent)
    got: Mapping[str, KeyValue | None]


# -- the client --------------------------------------------------------------------------------


def parse_urls(urls: str | Sequence[str]) -> list[str]:
    """``"http://a:2379,http://b:2379"`` or a list of them, checked; ValueError says what to
    fix. Only plain http is supported so far."""
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    found = [u.strip() for u in items if u.strip()]
    if not found:
        raise ValueError("no etcd URL given: pass --cluster http://HOST:PORT[,http://HOST:PORT]")
    for url in found:
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme != "http" or not parts.hostname or port is None or parts.path.strip("/"):
            raise ValueError(
                f"etcd URL {url!r} is not of the form http://HOST:PORT "
                "(https needs TLS settings, which stoker does not support yet)"
            )
    return found


def _target(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}"


def _kv(raw: Any) -> KeyValue:
    return KeyValue(
        key=bytes(raw.key).decode(),
        value=bytes(raw.value),
        create_revision=int(raw.create_revision),
        mod_revision=int(raw.mod_revision),
        version=int(raw.version),
        lease=int(raw.lease),
    )


class Etcd:
    """One connection (a gRPC channel over all members) to an etcd cluster.

    Every call takes ``timeout`` (default: the client's) and raises EtcdUnavailable when no
    member answers within it, so a caller never hangs on a partition.

        async with Etcd(["http://127.0.0.1:2379"]) as etcd:
            await etcd.create("/stoker/vms/web", b"{...}")
    """

    def __init__(self, urls: str | Sequence[str], *, timeout: float = DEFAULT_TIMEOUT) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.urls = parse_urls(urls)
        self.timeout = timeout
        manager = ConnectionManager(
            [_target(u) for u in self.urls],
            keepalive_time_ms=_PING_EVERY_MS,
            keepalive_timeout_ms=_PING_TIMEOUT_MS,
        )
        manager.grpc_options.extend(_RECONNECT_OPTIONS)
        self._channel = manager.get_channel()
        self._kv = KVService(self._channel)
        self._leases = LeaseService(self._channel)
        self._members = ClusterService(self._channel)
        self._watch_stub = WatchStub(self._channel)

    async def __aenter__(self) -> Etcd:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    # -- plumbing ------------------------------------------------------------------------------

    async def _call(
        self,
        what: str,
        call: Callable[[float], Awaitable[T]],
        timeout: float | None,
        lease: int = 0,
    ) -> T:
        """Run one call under a deadline and turn every failure into a facade error."""
        limit = self.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                return await call(limit)
        except TimeoutError as exc:
            raise EtcdUnavailable(self.urls, f"{what}: no answer within {limit:g} s") from exc
        except (EtcdConnectionError, EtcdTransientError) as exc:
            raise EtcdUnavailable(self.urls, f"{what}: {exc}") from exc
        except grpc.aio.AioRpcError as exc:
            raise self._rpc_error(what, exc, lease) from exc

    def _rpc_error(self, what: str, exc: grpc.aio.AioRpcError, lease: int = 0) -> EtcdError:
        code, detail = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.NOT_FOUND and "lease not found" in detail and lease:
            return LeaseNotFound(lease)
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return EtcdUnavailable(self.urls, f"{what}: {detail or code.name}")
        if code == grpc.StatusCode.OUT_OF_RANGE and "compacted" in detail:
            return EtcdError(f"etcd refused {what}: {detail} (read again at the latest revision)")
        return EtcdError(f"etcd refused {what}: {detail or code.name}")

    # -- keys ----------------------------------------------------------------------------------

    async def revision(self, *, timeout: float | None = None) -> int:
        """The store's current revision: a cheap 'is the cluster there and has a quorum?'."""
        resp = await self._call(
            "read the revision",
            lambda t: self._kv.get(b"\x00", count_only=True, timeout=t),
            timeout,
        )
        return int(resp.header.revision)

    async def get(self, key: str, *, timeout: float | None = None) -> KeyValue | None:
        resp = await self._call(f"get {key}", lambda t: self._kv.get(key, timeout=t), timeout)
        return _kv(resp.kvs[0]) if resp.kvs else None

    async def put(
        self, key: str, value: bytes, *, lease: int = 0, timeout: float | None = None
    ) -> int:
        """Write unconditionally (last writer wins); returns the new revision."""
        resp = await self._call(
            f"put {key}",
            lambda t: self._kv.put(key, value, lease=lease, timeout=t),
            timeout,
            lease,
        )
        return int(resp.header.revision)

    async def delete(self, key: str, *, prefix: bool = False, timeout: float | None = None) -> int:
        """Delete a key (or every key under a prefix); returns how many were deleted."""
        end = prefix_range_end(key) if prefix else None
        resp = await self._call(
            f"delete {key}", lambda t: self._kv.delete(key, range_end=end, timeout=t), timeout
        )
        return int(resp.deleted)

    async def range(
        self,
        prefix: str,
        *,
        limit: int = 0,
        start: str | None = None,
        revision: int = 0,
        timeout: float | None = None,
    ) -> Page:
        """Keys under ``prefix`` in key order, from ``start`` (a Page's ``next_start``),
        at most ``limit`` of them (0: all), as of ``revision`` (0: now)."""
        if start is not None and not start.startswith(prefix):
            raise ValueError(f"range start {start!r} is not under prefix {prefix!r}")
        if limit < 0:
            raise ValueError(f"limit must not be negative, got {limit}")
        first = start if start is not None else prefix
        end = prefix_range_end(prefix)
        resp = await self._call(
            f"range {prefix}",
            lambda t: self._kv.get(first, range_end=end, revision=revision, limit=limit, timeout=t),
            timeout,
        )
        return Page(
            items=tuple(_kv(raw) for raw in resp.kvs),
            revision=int(resp.header.revision),
            more=bool(resp.more),
            remaining=int(resp.count),
        )

    async def txn(
        self,
        when: Sequence[Condition],
        then: Sequence[Op],
        otherwise: Sequence[Op] = (),
        *,
        timeout: float | None = None,
    ) -> TxnResult:
        """All of ``then`` if every condition holds, else all of ``otherwise``, atomically.

        Never retried here: a transaction whose answer was lost may have been applied, and
        only the caller knows how to tell (read ``got`` or the key, and compare)."""
        resp = await self._call(
            "transaction",
            lambda t: self._kv.txn(
                [c._proto() for c in when],
                [_op_proto(op) for op in then],
                [_op_proto(op) for op in otherwise],
                timeout=t,
                max_attempts=1,
            ),
            timeout,
            next((op.lease for op in [*then, *otherwise] if isinstance(op, Put) and op.lease), 0),
        )
        branch = then if resp.succeeded else otherwise
        got: dict[str, KeyValue | None] = {}
        for op, answer in zip(branch, resp.responses, strict=True):
            if isinstance(op, Get):
                kvs = answer.response_range.kvs
                got[op.key] = _kv(kvs[0]) if kvs else None
        return TxnResult(bool(resp.succeeded), int(resp.header.revision), got)

    async def create(
        self, key: str, value: bytes, *, lease: int = 0, timeout: float | None = None
    ) -> TxnResult:
        """Create the key only if it does not exist. When it did, ``got[key]`` is the
        current record (the winner's)."""
        return await self.txn([absent(key)], [Put(key, value, lease)], [Get(key)], timeout=timeout)

    async def replace(
        self,
        key: str,
        value: bytes,
        *,
        mod_revision: int,
        lease: int = 0,
        timeout: float | None = None,
    ) -> TxnResult:
        """Compare-and-swap: write only if the key is still at ``mod_revision``. When it is
        not, ``got[key]`` is the current record (None if it was deleted)."""
        return await self.txn(
            [unchanged(key, mod_revision)], [Put(key, value, lease)], [Get(key)], timeout=timeout
        )

    async def delete_if(
        self, key: str, *, mod_revision: int, timeout: float | None = None
    ) -> TxnResult:
        """Delete only if the key is still at ``mod_revision``."""
        return await self.txn(
            [unchanged(key, mod_revision)], [Delete(key)], [Get(key)], timeout=timeout
        )

    async def members(self, *, timeout: float | None = None) -> list[Member]:
        """Every member of the etcd cluster (a linearizable read: it needs a leader)."""
        resp = await self._call(
            "list members",
            lambda t: self._members.member_list(timeout=t, max_attempts=1),
            timeout,
        )
        return [
            Member(int(m.ID), str(m.name), tuple(str(u) for u in m.clientURLs))
            for m in resp.members
        ]

    # -- leases --------------------------------------------------------------------------------

    async def grant(self, ttl: int, *, timeout: float | None = None) -> Lease:
        if ttl < 1:
            raise ValueError(f"a lease TTL is a whole number of seconds >= 1, got {ttl}")
        resp = await self._call(
            "grant a lease", lambda t: self._leases.grant(ttl, timeout=t), timeout
        )
        return Lease(id=int(resp.ID), ttl=int(resp.TTL))

    async def revoke(self, lease_id: int, *, timeout: float | None = None) -> None:
        """Revoke a lease (its keys are deleted at once); an unknown lease is not an error."""
        try:
            await self._call(
                f"revoke lease {lease_id:x}",
                lambda t: self._leases.revoke(lease_id, timeout=t),
                timeout,
            )
        except EtcdError as exc:
            if "not found" not in str(exc):
                raise

    async def time_to_live(self, lease_id: int, *, timeout: float | None = None) -> int:
        """Seconds the lease has left; -1 when it is gone."""
        resp = await self._call(
            f"read lease {lease_id:x}",
            lambda t: self._leases.time_to_live(lease_id, timeout=t),
            timeout,
        )
        return int(resp.TTL)

    async def renew(self, lease_id: int, *, timeout: float | None = None) -> int:
        """One keep-alive round trip; returns the TTL the lease has again, from about now.

        Raises LeaseNotFound when etcd says the lease is gone and EtcdUnavailable when no
        answer came within ``timeout``: LeaseKeeper turns these into its states.
        """

        async def once(limit: float) -> int:
            call = self._leases.keep_alive(lease_id)
            try:
                async for answer in call:
                    return int(answer.TTL)
                raise EtcdUnavailable(self.urls, "keep-alive stream closed without an answer")
            finally:
                call.cancel()

        ttl = await self._call(f"renew lease {lease_id:x}", once, timeout, lease_id)
        if ttl <= 0:
            raise LeaseNotFound(lease_id)
        return ttl

    # -- watches -------------------------------------------------------------------------------

    async def watch(
        self, key: str, *, prefix: bool = True, start_revision: int = 0
    ) -> AsyncIterator[WatchEvent]:
        """Every change to ``key`` (or under it, with ``prefix``) from ``start_revision``
        (0: from now), in revision order, each exactly once.

        The stream is re-opened whenever it breaks (a member died, lost its leader, the
        connection went silent), from the revision after the last event delivered, so a
        leader change costs latency, never an event. RevisionCompacted when etcd no longer
        has the history to resume from.
        """
        end = prefix_range_end(key) if prefix else b""
        next_revision = start_revision
        delay, max_delay = _WATCH_BACKOFF
        while True:
            request = WatchRequest(
                create_request=WatchCreateRequest(
                    key=key.encode(), range_end=end, start_revision=next_revision
                )
            )
            stream = self._watch_stub.Watch(_requests(request), metadata=_REQUIRE_LEADER)
            try:
                async for answer in stream:
                    if answer.compact_revision:
                        raise RevisionCompacted(next_revision, int(answer.compact_revision))
                    if answer.canceled:
                        log.info("etcd cancelled a watch on %s: %s", key, answer.cancel_reason)
                        break
                    if answer.created:
                        if next_revision == 0:
                            next_revision = int(answer.header.revision) + 1
                        continue
                    if not answer.events:
                        # a progress notice: etcd sends it only once the watch is caught up
                        next_revision = max(next_revision, int(answer.header.revision) + 1)
                        continue
                    for event in answer.events:
                        kv = _kv(event.kv)
                        next_revision = kv.mod_revision + 1
                        yield WatchEvent("delete" if event.type == 1 else "put", kv)
                    delay = _WATCH_BACKOFF[0]
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.UNAUTHENTICATED,
                ):
                    raise self._rpc_error(f"watch {key}", exc) from exc
                log.info(
                    "watch on %s broke (%s); resuming at revision %d",
                    key,
                    exc.code().name,
                    next_revision,
                )
            finally:
                stream.cancel()
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)


async def _requests(first: Any) -> AsyncIterator[Any]:
    """A watch stream's requests: the create request, then nothing until it is cancelled."""
    yield first
    await asyncio.Event().wait()
