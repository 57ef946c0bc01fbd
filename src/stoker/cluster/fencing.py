"""When a node may run its cluster VMs, and when it must kill them (pure: times are passed in,
monotonic seconds).

The node's lease is known to be alive until at least ``base + TTL``, where ``base`` is the
latest of two kinds of proof:

- the *send* time of the last renewal etcd acknowledged (etcd counts the TTL from when it
  received it, which is later; a leader change only extends leases);
- the *start* of a probe round, completed before the current deadline, in which every etcd
  member either refused the connection (not running) or said it had no leader. Any leader
  after that round was elected after it, and a new leader extends every lease by its full TTL
  before it can expire one, so the lease cannot expire before ``round start + TTL``.

The node starts killing its cluster VMs at ``deadline = base + fraction x TTL - kill_budget``
so the kill is done by ``base + fraction x TTL``, leaving ``(1 - fraction) x TTL`` for clock
rate differences and the guard process. docs/cluster.md has the full argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Standing(StrEnum):
    #: the last renewal got through and the deadline is ahead
    ALIVE = "alive"
    #: a renewal failed; the deadline is still ahead
    AT_RISK = "at-risk"
    #: renewals fail but etcd is down (or leaderless) everywhere: no lease can expire
    HOLD = "hold"
    #: the deadline passed without proof of life: cluster VMs must not run here
    FENCED = "fenced"
    #: etcd said the lease is gone: a new lease is needed before anything runs
    EXPIRED = "expired"


RUNNABLE = frozenset({Standing.ALIVE, Standing.AT_RISK, Standing.HOLD})


@dataclass
class Fence:
    """The fence of one lease. ``ttl`` is the lease's TTL as both sides agree on it (the
    smaller of what was asked and what etcd granted)."""

    ttl: float
    fraction: float
    kill_budget: float
    #: latest proof that the lease is alive until base + ttl
    base: float
    failing: bool = False
    holding: bool = False
    expired: bool = False

    def __post_init__(self) -> None:
        if self.window <= 0:
            raise ValueError(
                f"fence window {self.window:.2f} s is not positive (ttl {self.ttl:g} s x "
                f"{self.fraction:g} - kill budget {self.kill_budget:g} s)"
            )

    @property
    def window(self) -> float:
        return self.ttl * self.fraction - self.kill_budget

    @property
    def deadline(self) -> float:
        """Start killing cluster VMs at this moment unless new proof arrives first."""
        return self.base + self.window

    @property
    def guard_deadline(self) -> float:
        """The guard process kills whatever is left at this moment (still inside the
        fraction of the TTL)."""
        return self.deadline + self.kill_budget / 2

    @property
    def earliest_expiry(self) -> float:
        """etcd cannot expire the lease before this moment."""
        return self.base + self.ttl

    def renewed(self, sent_at: float) -> None:
        """etcd acknowledged a renewal sent at ``sent_at``."""
        if self.expired:
            return
        self.base = max(self.base, sent_at)
        self.failing = False
        self.holding = False

    def renewal_failed(self) -> None:
        self.failing = True

    def outage_round(self, started: float, finished: float, etcd_down: bool) -> bool:
        """A probe round ran from ``started`` to ``finished``; ``etcd_down``: every member
        refused or was leaderless. True when it extended the deadline."""
        if not etcd_down:
            self.holding = False
            return False
        if self.expired or finished >= self.deadline:
            # too late: the lease may have expired before the round began
            self.holding = False
            return False
        self.base = max(self.base, started)
        self.holding = True
        return True

    def lease_gone(self) -> None:
        self.expired = True

    def standing(self, now: float) -> Standing:
        if self.expired:
            return Standing.EXPIRED
        if now >= self.deadline:
            return Standing.FENCED
        if self.holding:
            return Standing.HOLD
        if self.failing:
            return Standing.AT_RISK
        return Standing.ALIVE

    def may_run(self, now: float) -> bool:
        return self.standing(now) in RUNNABLE


def renew_interval(ttl: float, window: float) -> float:
    """How often to renew: a third of the TTL, but at least four tries inside the window."""
    return max(0.05, min(ttl / 3, window / 4))
