"""This node's membership: its lease (resumed across agent restarts), its registration
(``alive/`` bound to the lease, ``nodes/`` with capacity, labels and address) and its fence.

Renewals go out every ``renew_interval`` (at least four tries inside the fence window). When
one fails, every further try is followed by a probe round (``probe.py``): if etcd is down or
leaderless everywhere the fence is extended (no lease can expire then), otherwise the node
heads for its deadline and the fencer kills its cluster VMs there. The fence and the VMMs to
kill are written to ``fence.json`` for the guard process after every change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from stoker.cluster import keys
from stoker.cluster.config import ClusterConfig
from stoker.cluster.etcd import (
    Etcd,
    EtcdError,
    EtcdUnavailable,
    Get,
    LeaseNotFound,
    Put,
    absent,
)
from stoker.cluster.fencing import Fence, Standing, renew_interval
from stoker.cluster.guard import FenceState, ensure_guard, read_state, write_state
from stoker.cluster.probe import etcd_down_everywhere
from stoker.cluster.records import AliveRecord, NodeInfo, now_utc
from stoker.services.loops import cancel

log = logging.getLogger("stoker.cluster")

MEMBERS_REFRESH_S = 30.0
RETRY_S = 0.05


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


class GuardLink:
    """What the guard process is told: the fence deadline and the VMMs to kill."""

    def __init__(self, directory: Path, data_dir: Path, spawn: bool = True) -> None:
        self.directory = directory
        self.state = FenceState(data_dir=str(data_dir))
        self.base: float | None = None
        self.lease: int | None = None
        self.spawn = spawn

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        # keep guarding what the previous agent listed until this one lists its own
        self.state.vms = self.previous_vms()
        if self.spawn:
            ensure_guard(self.directory)

    def set_fence(self, fence: Fence | None, lease: int | None) -> None:
        usable = fence is not None and not fence.expired
        self.state.deadline = fence.guard_deadline if fence is not None and usable else 0.0
        self.base = fence.base if fence is not None else None
        self.lease = lease
        self._write()

    def set_vms(self, vms: dict[str, tuple[int, int] | None]) -> None:
        if vms != self.state.vms:
            self.state.vms = dict(vms)
            self._write()

    def _write(self) -> None:
        try:
            write_state(self.directory, self.state)
            if self.base is not None:
                line = f"{self.lease or 0:x} {self.base!r} {_boot_id()}\n"
                (self.directory / "lease").write_text(line)
        except OSError as exc:
            log.error("cannot write the fence file in %s: %s", self.directory, exc)

    def previous(self) -> tuple[int, float] | None:
        """The lease id and fence base the previous agent left, if any; only from this boot
        (CLOCK_MONOTONIC starts again at a reboot, so an older base would mean nothing)."""
        try:
            lease_hex, base, boot = (self.directory / "lease").read_text().split()
            if boot != _boot_id():
                return None
            return int(lease_hex, 16), float(base)
        except (OSError, ValueError):
            return None

    def previous_vms(self) -> dict[str, tuple[int, int] | None]:
        state = read_state(self.directory)
        return dict(state.vms) if state is not None else {}


class NodeSession:
    def __init__(
        self,
        etcd: Etcd,
        cfg: ClusterConfig,
        info: Callable[[], NodeInfo],
        guard: GuardLink,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.etcd = etcd
        self.cfg = cfg
        self.info = info
        self.guard = guard
        self.clock = clock
        self.lease_id: int | None = None
        self.fence: Fence | None = None
        self.registered = False
        self.last_error: str | None = None
        #: why registration is refused (another live agent with this node name)
        self.conflict: str | None = None
        #: each etcd member's client URLs, as the cluster last listed them
        self.members: list[list[str]] = [[url] for url in cfg.endpoints]
        #: bumped whenever the lease or the registration changes
        self.generation = 0
        self._members_at = -MEMBERS_REFRESH_S
        self._task: asyncio.Task[None] | None = None

    # -- what others ask -----------------------------------------------------------------------

    def standing(self) -> Standing:
        if self.fence is None:
            return Standing.FENCED
        return self.fence.standing(self.clock())

    def may_run(self) -> bool:
        """Cluster VMs may run here now: the lease is in good standing (alive, at risk but
        inside the fence window, or held through an etcd outage)."""
        return self.fence is not None and self.fence.may_run(self.clock())

    def remaining(self) -> float:
        """Seconds until the fence deadline (0 when past or unknown)."""
        return 0.0 if self.fence is None else max(0.0, self.fence.deadline - self.clock())

    # -- running -------------------------------------------------------------------------------

    def resume_previous(self) -> None:
        """Take over the fence of the agent that ran before on this data dir: its VMs may
        still run and are guarded by that fence until a renewal proves more."""
        previous = self.guard.previous()
        if previous is not None and previous[0]:
            self.lease_id, base = previous
            self.fence = self._fence(float(self.cfg.lease_ttl_s), base)
        self.guard.set_fence(self.fence, self.lease_id)  # no fence: nothing may run yet

    async def start(self) -> None:
        self.guard.start()
        self.resume_previous()
        self._task = asyncio.create_task(self._run(), name="cluster lease")

    async def stop(self) -> None:
        await cancel(self._task)
        self._task = None

    def _fence(self, ttl: float, base: float) -> Fence:
        return Fence(
            ttl=min(float(self.cfg.lease_ttl_s), ttl),
            fraction=self.cfg.fence_fraction,
            kill_budget=self.cfg.kill_budget_s,
            base=base,
        )

    def _changed(self) -> None:
        self.guard.set_fence(self.fence, self.lease_id)

    async def _run(self) -> None:
        while True:
            try:
                if self.lease_id is None or (self.fence is not None and self.fence.expired):
                    await self._acquire()
                await self._renew_once()
            except asyncio.CancelledError:
                raise
            except EtcdError as exc:
                self.last_error = str(exc)
                await asyncio.sleep(0.2)
            except Exception:
                log.exception("cluster lease loop failed; retrying")
                await asyncio.sleep(0.5)

    async def _acquire(self) -> None:
        """A lease: the one the previous agent left if etcd still has it, else a new one."""
        if self.lease_id is not None and self.fence is not None and not self.fence.expired:
            return
        sent = self.clock()
        lease = await self.etcd.grant(self.cfg.lease_ttl_s, timeout=self.cfg.etcd_timeout_s)
        self.lease_id = lease.id
        self.fence = self._fence(float(lease.ttl), sent)
        self.registered = False
        self.generation += 1
        self._changed()
        log.info("cluster: new lease %x (TTL %d s)", lease.id, lease.ttl)
        await self._register()

    async def _register(self) -> None:
        assert self.lease_id is not None
        info = self.info()
        me = self.cfg.node_name
        alive = AliveRecord(lease=self.lease_id, since=now_utc())
        result = await self.etcd.txn(
            [absent(keys.alive(me))],
            [Put(keys.alive(me), alive.dump(), self.lease_id)],
            [Get(keys.alive(me))],
            timeout=self.cfg.etcd_timeout_s,
        )
        if not result.succeeded:
            current = result.got.get(keys.alive(me))
            if current is not None and current.lease != self.lease_id:
                self.conflict = (
                    f"node name {me!r} is already alive in the cluster under lease "
                    f"{current.lease:x}: another agent with this node_name runs, or a previous "
                    "agent's lease has not expired yet (it does within the TTL)"
                )
                log.warning("cluster: %s", self.conflict)
                return
        await self.etcd.put(keys.node(me), info.dump(), timeout=self.cfg.etcd_timeout_s)
        self.conflict = None
        self.registered = True
        self.generation += 1
        log.info("cluster: node %s registered under lease %x", me, self.lease_id)

    async def _renew_once(self) -> bool:
        """One renewal (and, when it fails, one probe round); True when it got through."""
        assert self.lease_id is not None and self.fence is not None
        fence = self.fence
        interval = renew_interval(fence.ttl, fence.window)
        sent = self.clock()
        timeout = max(0.1, min(interval, fence.deadline - sent, self.cfg.etcd_timeout_s))
        try:
            await self.etcd.renew(self.lease_id, timeout=timeout)
        except LeaseNotFound as exc:
            self.last_error = str(exc)
            fence.lease_gone()
            self.registered = False
            self.generation += 1
            self._changed()
            log.warning("cluster: %s; cluster VMs here are fenced", exc)
            return False
        except EtcdUnavailable as exc:
            self.last_error = str(exc)
            fence.renewal_failed()
            if self.cfg.hold_when_etcd_down:
                started = self.clock()
                down, _states = await etcd_down_everywhere(self.members)
                if (
                    fence.outage_round(started, self.clock(), down)
                    and fence.standing(self.clock()) == Standing.HOLD
                ):
                    log.debug("cluster: etcd is down everywhere; holding")
            self._changed()
            await asyncio.sleep(RETRY_S)
            return False
        was_failing = fence.failing or fence.holding
        fence.renewed(sent)
        self.last_error = None
        self._changed()
        if was_failing:
            log.info("cluster: lease %x renewed again", self.lease_id)
        if self.registered:
            await self._maintain()
        else:
            await self._register()
        await asyncio.sleep(max(0.0, sent + interval - self.clock()))
        return True

    async def _maintain(self) -> None:
        """Now and then, while etcd answers: refresh the member list (what a probe round
        must cover) and this node's record."""
        now = self.clock()
        if now - self._members_at < MEMBERS_REFRESH_S:
            return
        self._members_at = now
        with contextlib.suppress(EtcdError):
            members = await self.etcd.members(timeout=self.cfg.etcd_timeout_s)
            listed = [list(m.client_urls) for m in members]
            if listed:
                # a member that has not started yet has no client URL: the round cannot
                # prove anything about it, so it keeps every round from qualifying
                self.members = listed
        with contextlib.suppress(EtcdError):
            await self.etcd.put(
                keys.node(self.cfg.node_name), self.info().dump(), timeout=self.cfg.etcd_timeout_s
            )
