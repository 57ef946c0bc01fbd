"""Probe-result bookkeeping: from single check results to healthy, unhealthy or unknown.

Pure: one probe's verdict only changes after ``failure_threshold`` failures in a row (or
``success_threshold`` successes in a row), so one slow answer never restarts a VM and one lucky
answer never clears an alarm. A VM's health is the worst of its probes' verdicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum

#: How many recent results each probe keeps (history survives agent restarts in the store).
HISTORY = 10


class Health(StrEnum):
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Result:
    """One check: ok or not, what it said, when, and how long it took."""

    ok: bool
    message: str
    at: datetime
    duration_s: float = 0.0


@dataclass(frozen=True)
class ProbeState:
    """What one probe of one VM has seen so far."""

    name: str
    kind: str
    status: Health = Health.UNKNOWN
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    last_message: str | None = None
    last_error: str | None = None
    last_at: datetime | None = None
    last_ok_at: datetime | None = None
    checks: int = 0
    failures: int = 0
    history: tuple[Result, ...] = field(default=())

    def reset(self) -> ProbeState:
        """A new VMM: the counters restart, the history stays."""
        return replace(self, status=Health.UNKNOWN, consecutive_failures=0, consecutive_successes=0)


def record(
    state: ProbeState, result: Result, failure_threshold: int, success_threshold: int
) -> ProbeState:
    """Fold one result into a probe's state; the status flips only at a threshold."""
    if failure_threshold < 1 or success_threshold < 1:
        raise ValueError("thresholds start at 1")
    history = (*state.history, result)[-HISTORY:]
    if result.ok:
        successes, failures = state.consecutive_successes + 1, 0
        status = Health.HEALTHY if successes >= success_threshold else state.status
        if state.status == Health.UNHEALTHY and successes < success_threshold:
            status = Health.UNHEALTHY
    else:
        successes, failures = 0, state.consecutive_failures + 1
        status = Health.UNHEALTHY if failures >= failure_threshold else state.status
    return replace(
        state,
        status=status,
        consecutive_failures=failures,
        consecutive_successes=successes,
        last_message=result.message,
        last_error=state.last_error if result.ok else result.message,
        last_at=result.at,
        last_ok_at=result.at if result.ok else state.last_ok_at,
        checks=state.checks + 1,
        failures=state.failures + (0 if result.ok else 1),
        history=history,
    )


def overall(probes: list[ProbeState] | tuple[ProbeState, ...], running: bool) -> Health:
    """A VM's health: unknown unless running; unhealthy if any probe is; healthy if all are."""
    if not running or not probes:
        return Health.UNKNOWN
    statuses = {p.status for p in probes}
    if Health.UNHEALTHY in statuses:
        return Health.UNHEALTHY
    if statuses == {Health.HEALTHY}:
        return Health.HEALTHY
    return Health.UNKNOWN


def worst_error(probes: list[ProbeState] | tuple[ProbeState, ...]) -> tuple[int, str | None]:
    """The largest run of failures among the probes and the error behind it (for summaries)."""
    failing = [p for p in probes if p.consecutive_failures]
    if not failing:
        errored = [p for p in probes if p.last_error and p.last_at]
        latest = max(errored, key=lambda p: p.last_at.timestamp(), default=None)  # type: ignore[union-attr]
        return 0, latest.last_error if latest else None
    worst = max(failing, key=lambda p: p.consecutive_failures)
    return worst.consecutive_failures, worst.last_error
