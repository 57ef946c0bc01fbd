"""Restart decisions: whether, when, and for how long to keep trying.

A pure function of the policy, why the VM stopped and its recent history, so the supervisor
only carries it out. The original's restart never worked; this one is decided in one place and
tested for every policy and stop reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from stoker.domain.spec import RestartPolicy, RestartPolicyKind

PolicyKind = Literal["never", "on-failure", "always"]
StopReason = Literal["error", "unhealthy", "clean-poweroff", "operator"]

#: Stops that count as failures for "on-failure".
FAILURES: frozenset[str] = frozenset({"error", "unhealthy"})
#: Caps the exponent so a large attempt number cannot overflow before the max applies.
_MAX_EXPONENT = 1000


@dataclass(frozen=True)
class RestartDecision:
    """restart: start again after delay_s. attempt: the restart count this decision makes
    (the count so far when not restarting). give_up: the policy wanted a restart but the
    retry limit was reached, so the VM should be left in error and an operator told."""

    restart: bool
    delay_s: float
    attempt: int
    reason: str
    give_up: bool = False


def backoff_delay(attempt: int, initial_s: float, max_s: float) -> float:
    """Exponential backoff: initial, 2x initial, 4x initial, ... capped at max_s."""
    if attempt < 1:
        raise ValueError(f"attempt numbers start at 1, got {attempt}")
    return min(initial_s * 2.0 ** min(attempt - 1, _MAX_EXPONENT), max_s)


def decide(
    policy: PolicyKind | RestartPolicyKind,
    stop_reason: StopReason,
    restarts_so_far: int,
    max_retries: int,
    backoff_initial_s: float,
    backoff_max_s: float,
    stable_after_s: float,
    last_run_s: float | None,
) -> RestartDecision:
    """Decide whether to restart a VM that just stopped.

    An operator stop is never undone. "never" never restarts; "on-failure" restarts after an
    error or a failed health check; "always" also after the guest powered itself off. A run
    of at least stable_after_s resets the count (last_run_s None means it never got going, so
    no reset). With max_retries restarts already made, give up.
    """
    if restarts_so_far < 0 or max_retries < 0:
        raise ValueError("restart counts cannot be negative")
    stable = last_run_s is not None and last_run_s >= stable_after_s
    count = 0 if stable else restarts_so_far

    kind = str(policy)
    if kind not in ("never", "on-failure", "always"):
        raise ValueError(f"unknown restart policy {kind!r}")
    if stop_reason == "operator":
        return RestartDecision(False, 0.0, count, "stopped by an operator")
    if kind == "never":
        return RestartDecision(False, 0.0, count, "restart policy is 'never'")
    if kind == "on-failure" and stop_reason not in FAILURES:
        return RestartDecision(
            False, 0.0, count, f"policy 'on-failure' does not restart after {stop_reason}"
        )
    if count >= max_retries:
        return RestartDecision(
            False, 0.0, count, f"restart limit reached ({max_retries})", give_up=True
        )
    attempt = count + 1
    delay = backoff_delay(attempt, backoff_initial_s, backoff_max_s)
    why = "after a stable run, " if stable and restarts_so_far else ""
    return RestartDecision(
        True, delay, attempt, f"{why}restart {attempt} of {max_retries} after {stop_reason}"
    )


def decide_for(
    policy: RestartPolicy, stop_reason: StopReason, restarts_so_far: int, last_run_s: float | None
) -> RestartDecision:
    """decide() with the numbers taken from a VM spec's restart policy."""
    return decide(
        policy.policy,
        stop_reason,
        restarts_so_far,
        policy.max_retries,
        policy.backoff_initial_s,
        policy.backoff_max_s,
        policy.stable_after_s,
        last_run_s,
    )
