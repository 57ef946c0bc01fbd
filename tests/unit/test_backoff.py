"""Restart decisions for every policy and stop reason, backoff growth and the retry limit."""

from __future__ import annotations

import itertools

import pytest

from stoker.domain.backoff import backoff_delay, decide, decide_for
from stoker.domain.spec import RestartPolicy, RestartPolicyKind


def d(policy: str = "always", reason: str = "error", restarts: int = 0, **kw):  # type: ignore[no-untyped-def]
    args = {
        "max_retries": 20,
        "backoff_initial_s": 1.0,
        "backoff_max_s": 300.0,
        "stable_after_s": 60.0,
        "last_run_s": 5.0,
    }
    args.update(kw)
    return decide(policy, reason, restarts, **args)  # type: ignore[arg-type]


def test_delays_double_and_cap_at_300() -> None:
    delays = [d(restarts=n).delay_s for n in range(12)]
    assert delays == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]
    assert [d(restarts=n).attempt for n in range(3)] == [1, 2, 3]


def test_huge_attempt_does_not_overflow() -> None:
    assert backoff_delay(10_000, 1.0, 300.0) == 300.0


def test_stable_run_resets_the_count() -> None:
    dec = d(restarts=7, last_run_s=60.0)
    assert dec.restart and dec.attempt == 1 and dec.delay_s == 1.0
    assert d(restarts=7, last_run_s=59.9).attempt == 8
    assert d(restarts=7, last_run_s=None).attempt == 8


def test_give_up_at_max_retries() -> None:
    assert d(restarts=2, max_retries=3).restart
    dec = d(restarts=3, max_retries=3)
    assert not dec.restart and dec.give_up
    assert "restart limit reached" in dec.reason
    # ...unless the last run was stable, which starts a fresh series.
    assert d(restarts=3, max_retries=3, last_run_s=600.0).restart


def test_zero_retries_gives_up_at_once() -> None:
    dec = d(max_retries=0)
    assert not dec.restart and dec.give_up


EXPECTED = {
    ("never", "error"): False,
    ("never", "unhealthy"): False,
    ("never", "clean-poweroff"): False,
    ("never", "operator"): False,
    ("on-failure", "error"): True,
    ("on-failure", "unhealthy"): True,
    ("on-failure", "clean-poweroff"): False,
    ("on-failure", "operator"): False,
    ("always", "error"): True,
    ("always", "unhealthy"): True,
    ("always", "clean-poweroff"): True,
    ("always", "operator"): False,
}


@pytest.mark.parametrize(
    ("policy", "reason"),
    list(
        itertools.product(
            ["never", "on-failure", "always"], list(dict.fromkeys(r for _, r in EXPECTED))
        )
    ),
)
def test_policy_by_stop_reason(policy: str, reason: str) -> None:
    dec = d(policy, reason)
    assert dec.restart is EXPECTED[(policy, reason)]
    assert not dec.give_up
    if not dec.restart:
        assert dec.delay_s == 0.0 and dec.reason


def test_operator_stop_never_gives_up_or_restarts_even_at_the_limit() -> None:
    dec = d("always", "operator", restarts=99, max_retries=3)
    assert not dec.restart and not dec.give_up


def test_accepts_spec_enum_and_policy_object() -> None:
    assert d(RestartPolicyKind.ON_FAILURE, "error").restart
    policy = RestartPolicy(policy=RestartPolicyKind.ALWAYS, max_retries=2)
    assert decide_for(policy, "clean-poweroff", 0, None).delay_s == 1.0
    assert decide_for(policy, "error", 2, 1.0).give_up


def test_unknown_policy_rejected() -> None:
    with pytest.raises(ValueError, match="unknown restart policy"):
        d("sometimes", "operator")
