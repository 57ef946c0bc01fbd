"""Keeping one etcd lease alive, and saying early and plainly when that is failing.

Fencing depends on this: a node that cannot renew must stop its VMs *before* etcd lets the
lease expire and another node starts them. So the keeper does not just retry quietly; it
tracks the latest moment at which the lease can still be known to be alive (``expires_at``:
when the last acknowledged renewal was *sent*, plus the granted TTL; etcd counts from when it
received it, which is later, so this is never optimistic) and reports

- ``at-risk`` at the first failed renewal (a third of the TTL, or less, before any expiry),
- ``alive`` again when a renewal gets through,
- ``expired`` when etcd says the lease is gone or ``expires_at`` has passed: final.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from enum import StrEnum

from stoker.cluster.etcd import Etcd, EtcdError, EtcdUnavailable, Lease, LeaseNotFound
from stoker.services.loops import cancel

log = logging.getLogger(__name__)


class LeaseState(StrEnum):
    ALIVE = "alive"
    AT_RISK = "at-risk"
    EXPIRED = "expired"


Listener = Callable[[LeaseState, "LeaseKeeper"], None]


class LeaseKeeper:
    """Renews ``lease`` every TTL/3 (each attempt bounded so that no call outlives the
    lease) and retries fast after a failure.

        async with LeaseKeeper(etcd, lease, on_change=fence) as keeper:
            ...
            await keeper.expired.wait()
    """

    def __init__(
        self,
        etcd: Etcd,
        lease: Lease,
        *,
        on_change: Listener | None = None,
        clock: Callable[[], float] = time.monotonic,
        granted_at: float | None = None,
    ) -> None:
        self.etcd = etcd
        self.lease = lease
        self.interval = lease.ttl / 3
        self.retry = min(0.1, self.interval / 2)
        self._clock = clock
        self._listeners: list[Listener] = [on_change] if on_change else []
        #: the lease is known alive until then (monotonic seconds); grant time + TTL at first
        self.expires_at = (clock() if granted_at is None else granted_at) + lease.ttl
        self.state = LeaseState.ALIVE
        self.last_error: str | None = None
        #: set once, when the lease is (or must be assumed) gone
        self.expired = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def grant(cls, etcd: Etcd, ttl: int, *, on_change: Listener | None = None) -> LeaseKeeper:
        """Grant a fresh lease and a keeper for it (not started)."""
        sent = time.monotonic()
        lease = await etcd.grant(ttl)
        return cls(etcd, lease, on_change=on_change, granted_at=sent)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def remaining(self) -> float:
        """Seconds until the lease may be gone, as far as this node can know; never negative."""
        return max(0.0, self.expires_at - self._clock())

    # -- running -------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"lease-{self.lease.id:x}")

    async def stop(self, *, revoke: bool = False) -> None:
        """Stop renewing; with ``revoke`` also delete the lease (and its keys) now."""
        await cancel(self._task)
        self._task = None
        if revoke and self.state != LeaseState.EXPIRED:
            try:
                await self.etcd.revoke(self.lease.id)
            except EtcdError as exc:
                log.warning("could not revoke lease %x: %s", self.lease.id, exc)
            self._set(LeaseState.EXPIRED)

    async def __aenter__(self) -> LeaseKeeper:
        self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()

    async def _run(self) -> None:
        while self.state != LeaseState.EXPIRED:
            left = self.remaining()
            if left <= 0:
                self._fail("no renewal acknowledged within the lease TTL")
                return
            sent = self._clock()
            try:
                ttl = await self.etcd.renew(self.lease.id, timeout=min(self.interval, left))
            except LeaseNotFound as exc:
                self._fail(str(exc))
                return
            except EtcdUnavailable as exc:
                self.last_error = str(exc)
                self._set(LeaseState.AT_RISK)
                await asyncio.sleep(min(self.retry, self.remaining()))
                continue
            self.expires_at = max(self.expires_at, sent + ttl)
            self.last_error = None
            self._set(LeaseState.ALIVE)
            await asyncio.sleep(self.interval)

    def _fail(self, why: str) -> None:
        self.last_error = why
        self._set(LeaseState.EXPIRED)

    def _set(self, state: LeaseState) -> None:
        if state == self.state:
            return
        log.log(
            logging.INFO if state == LeaseState.ALIVE else logging.WARNING,
            "etcd lease %x: %s -> %s%s",
            self.lease.id,
            self.state,
            state,
            f" ({self.last_error})" if self.last_error else "",
        )
        self.state = state
        if state == LeaseState.EXPIRED:
            self.expired.set()
        for listener in list(self._listeners):
            try:
                listener(state, self)
            except Exception:
                log.exception("lease listener failed")
