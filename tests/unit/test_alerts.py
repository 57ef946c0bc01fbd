"""Threshold alerts raise once and clear only below the hysteresis band."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from stoker.domain.alerts import DEFAULT_THRESHOLDS, INACTIVE, AlertState, Threshold, evaluate

T = datetime(2025, 1, 1, tzinfo=UTC)


def run(threshold: Threshold, values: list[float]) -> list[str | None]:
    state = INACTIVE
    events = []
    for i, v in enumerate(values):
        state, event = evaluate(threshold, state, v, T + timedelta(seconds=i))
        events.append(event)
    return events


def test_defaults_follow_the_seed() -> None:
    assert DEFAULT_THRESHOLDS["cpu"].raise_at == 0.80
    assert DEFAULT_THRESHOLDS["cpu"].clear_at == pytest.approx(0.75)
    assert DEFAULT_THRESHOLDS["memory"].raise_at == 0.90
    assert DEFAULT_THRESHOLDS["memory"].clear_at == pytest.approx(0.85)


def test_crossing_raises_once_and_staying_above_does_not_reraise() -> None:
    assert run(DEFAULT_THRESHOLDS["cpu"], [0.5, 0.8, 0.95, 0.9, 0.81]) == [
        None,
        "raised",
        None,
        None,
        None,
    ]


def test_between_clear_and_raise_stays_active() -> None:
    th = DEFAULT_THRESHOLDS["cpu"]
    state, _ = evaluate(th, INACTIVE, 0.85, T)
    state2, event = evaluate(th, state, 0.77, T + timedelta(seconds=1))
    assert state2.active and event is None and state2.since == T
    state3, event = evaluate(th, state2, 0.75, T + timedelta(seconds=2))
    assert state3.active and event is None


def test_below_clear_at_clears_and_can_raise_again() -> None:
    assert run(DEFAULT_THRESHOLDS["memory"], [0.92, 0.849, 0.88, 0.9]) == [
        "raised",
        "cleared",
        None,
        "raised",
    ]


def test_since_records_the_transition_time() -> None:
    th = Threshold.at("cpu", 0.8)
    state, _ = evaluate(th, AlertState(), 0.9, T)
    assert state == AlertState(active=True, since=T)
    later = T + timedelta(minutes=5)
    state, event = evaluate(th, state, 0.1, later)
    assert event == "cleared" and state == AlertState(active=False, since=later)


def test_nan_changes_nothing() -> None:
    th = Threshold.at("cpu", 0.8)
    active = AlertState(True, T)
    assert evaluate(th, active, float("nan"), T) == (active, None)
    assert evaluate(th, INACTIVE, float("nan"), T) == (INACTIVE, None)


def test_clear_above_raise_rejected() -> None:
    with pytest.raises(ValueError, match="clear_at"):
        Threshold("cpu", raise_at=0.8, clear_at=0.9)
