"""Trend fitting and time-to-exhaustion forecasts."""

from __future__ import annotations

import random

import pytest

from stoker.domain.trend import (
    MIN_SAMPLES,
    confidence,
    fit,
    predict,
    time_to_exhaustion,
)

T0 = 1_700_000_000.0  # realistic epoch seconds, to catch precision trouble


def series(n: int, step: float, f) -> list[tuple[float, float]]:  # type: ignore[no-untyped-def]
    return [(T0 + i * step, f(i * step)) for i in range(n)]


def test_linear_growth_predicts_exhaustion_within_5_percent() -> None:
    # 1 MiB per minute from 1 GiB; capacity 2 GiB; 60 samples, one a minute.
    mib = 1024**2
    samples = series(60, 60.0, lambda s: 1024 * mib + s / 60 * mib)
    now = samples[-1][0]
    p = predict("memory", samples, capacity=2048 * mib, now_t=now)
    current = 1024 * mib + 59 * mib
    expected = (2048 * mib - current) / (mib / 60)
    assert p.exhausted_in_s is not None
    assert abs(p.exhausted_in_s - expected) <= 0.05 * expected
    assert p.slope_per_hour == pytest.approx(60 * mib)
    assert p.confidence.level == "high"


def test_flat_series_never_exhausts() -> None:
    p = predict("cpu", series(20, 60.0, lambda s: 5.0), capacity=10.0, now_t=T0 + 19 * 60)
    assert p.exhausted_in_s is None
    assert p.slope_per_hour == pytest.approx(0.0)


def test_decreasing_series_never_exhausts() -> None:
    samples = series(20, 60.0, lambda s: 8.0 - s / 3600)
    p = predict("cpu", samples, capacity=10.0, now_t=T0 + 19 * 60)
    assert p.exhausted_in_s is None


def test_already_at_capacity_is_zero() -> None:
    trend = fit(series(10, 1.0, lambda s: 10.0 + s))
    assert trend is not None
    assert time_to_exhaustion(trend, T0 + 9, capacity=15.0) == 0.0


def test_noise_lowers_r2_and_confidence() -> None:
    rng = random.Random(4)
    clean = series(40, 60.0, lambda s: 100.0 + s / 60)
    noisy = [(t, v + rng.gauss(0, 40)) for t, v in clean]
    clean_fit, noisy_fit = fit(clean), fit(noisy)
    assert clean_fit is not None and noisy_fit is not None
    assert clean_fit.r2 == pytest.approx(1.0)
    assert noisy_fit.r2 < 0.7
    now = clean[-1][0]
    assert predict("x", clean, 1e6, now).confidence.level == "high"
    assert predict("x", noisy, 1e6, now).confidence.level == "low"


def test_too_few_samples_has_no_confidence() -> None:
    samples = series(MIN_SAMPLES - 1, 60.0, lambda s: s)
    assert fit(samples) is None
    p = predict("memory", samples, capacity=1e9, now_t=samples[-1][0])
    assert p.confidence.level == "none"
    assert p.exhausted_in_s is None and p.slope_per_hour is None


def test_zero_time_spread_is_no_fit() -> None:
    assert fit([(T0, float(v)) for v in range(10)]) is None


def test_window_drops_old_and_future_samples() -> None:
    old = series(10, 60.0, lambda s: 0.0)
    recent = [(T0 + 2 * 86_400 + i * 60.0, 50.0 + i) for i in range(10)]
    future = [(T0 + 3 * 86_400, 1e12)]
    now = recent[-1][0]
    p = predict("disk", old + recent + future, capacity=100.0, now_t=now)
    assert p.confidence.n == 10
    assert p.slope_per_hour == pytest.approx(60.0)


def test_non_finite_samples_are_skipped() -> None:
    samples = [*series(6, 1.0, lambda s: s), (T0 + 7, float("nan"))]
    trend = fit(samples)
    assert trend is not None and trend.n == 6


def test_confidence_thresholds() -> None:
    assert confidence(4, 1.0).level == "none"
    assert confidence(5, 1.0).level == "low"
    assert confidence(10, 0.7).level == "medium"
    assert confidence(30, 0.9).level == "high"
    assert confidence(100, 0.5).level == "low"
