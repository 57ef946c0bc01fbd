"""Probe bookkeeping (thresholds, verdicts, history) and its persistence."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stoker.domain.health import HISTORY, Health, ProbeState, Result, overall, record, worst_error
from stoker.store.db import Database
from stoker.store.health import HealthStore

T0 = datetime(2026, 11, 21, 6, 0, tzinfo=UTC)


def feed(outcomes, failure_threshold=3, success_threshold=1) -> ProbeState:
    state = ProbeState(name="p", kind="http")
    for i, ok in enumerate(outcomes):
        result = Result(ok, "fine" if ok else f"bad {i}", T0 + timedelta(seconds=i))
        state = record(state, result, failure_threshold, success_threshold)
    return state


def test_unknown_until_the_first_success_then_healthy():
    assert feed([]).status == Health.UNKNOWN
    assert feed([True]).status == Health.HEALTHY


def test_unhealthy_only_after_failure_threshold_in_a_row():
    assert feed([True, False, False]).status == Health.HEALTHY
    state = feed([True, False, False, False])
    assert state.status == Health.UNHEALTHY
    assert state.consecutive_failures == 3
    assert state.last_error == "bad 3"
    assert state.last_ok_at == T0


def test_a_success_breaks_a_run_of_failures():
    assert feed([True, False, False, True, False, False]).status == Health.HEALTHY


def test_success_threshold_keeps_unhealthy_until_enough_successes():
    state = feed([False, False, False, True], success_threshold=2)
    assert state.status == Health.UNHEALTHY
    assert feed([False, False, False, True, True], success_threshold=2).status == Health.HEALTHY


def test_history_is_bounded_and_counts_everything():
    state = feed([True, False] * 20)
    assert len(state.history) == HISTORY
    assert state.checks == 40 and state.failures == 20


def test_reset_keeps_history_but_clears_the_verdict():
    state = feed([False] * 4).reset()
    assert state.status == Health.UNKNOWN and state.consecutive_failures == 0
    assert len(state.history) == 4


def test_overall_is_the_worst_probe_and_unknown_unless_running():
    healthy, bad = feed([True]), feed([False] * 3)
    assert overall([healthy, healthy], running=True) == Health.HEALTHY
    assert overall([healthy, bad], running=True) == Health.UNHEALTHY
    assert overall([healthy, feed([])], running=True) == Health.UNKNOWN
    assert overall([healthy], running=False) == Health.UNKNOWN
    assert overall([], running=True) == Health.UNKNOWN
    assert worst_error([healthy, bad]) == (3, "bad 2")


def test_thresholds_must_be_positive():
    with pytest.raises(ValueError):
        record(ProbeState("p", "vmm"), Result(True, "", T0), 0, 1)


@given(st.lists(st.booleans(), max_size=60), st.integers(1, 5), st.integers(1, 5))
def test_status_only_flips_at_a_threshold(outcomes, fail_n, ok_n):
    state = feed(outcomes, fail_n, ok_n)
    if state.status == Health.UNHEALTHY:
        assert state.consecutive_successes < ok_n
    if outcomes and outcomes[-fail_n:] == [False] * fail_n and len(outcomes) >= fail_n:
        assert state.status == Health.UNHEALTHY
    if len(outcomes) >= ok_n and outcomes[-ok_n:] == [True] * ok_n:
        assert state.status == Health.HEALTHY


def test_store_round_trip_survives_reopening(tmp_path):
    path = tmp_path / "s.db"
    db = Database(path)
    store = HealthStore(db)
    state = feed([True, False, False, False])
    store.save_probe("vm1", state)
    store.set_verdict("vm1", Health.UNHEALTHY, T0, "probe p failed 3 times")
    db.close()
    store = HealthStore(Database(path))
    [again] = store.probes("vm1")
    assert again == state
    assert store.verdict("vm1") == (Health.UNHEALTHY, T0, "probe p failed 3 times")
    store.drop_probes_except("vm1", ["other"])
    assert store.probes("vm1") == []
    store.delete("vm1")
    assert store.verdict("vm1") is None
