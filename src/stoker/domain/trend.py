"""Growth rate and time to exhaustion from a window of samples.

A least-squares line over every sample in the window, as Prometheus predict_linear does.
The original divided the change between two samples by the time between them, so one noisy
sample decided the forecast; a fit over the window does not, and r^2 says how far to trust it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

#: Fewer points than this give a line through noise, not a trend.
MIN_SAMPLES = 5
#: The seed keeps 24 hours of history for prediction.
DEFAULT_WINDOW_S = 24 * 3600.0

ConfidenceLevel = Literal["none", "low", "medium", "high"]

#: (level, minimum samples, minimum r^2), checked from the top. Below MIN_SAMPLES: "none";
#: anything else that fits: "low". With a 60 s resource check, 30 samples is half an hour.
CONFIDENCE_RULES: tuple[tuple[ConfidenceLevel, int, float], ...] = (
    ("high", 30, 0.90),
    ("medium", 10, 0.70),
)


@dataclass(frozen=True)
class Trend:
    """value ~= slope_per_s * t + intercept, fitted over n samples spanning span_s seconds."""

    slope_per_s: float
    intercept: float
    r2: float
    n: int
    span_s: float

    def value_at(self, t: float) -> float:
        return self.slope_per_s * t + self.intercept


def fit(samples: Sequence[tuple[float, float]]) -> Trend | None:
    """Least-squares line over (t seconds, value); None without enough points or time spread.

    Samples with a non-finite time or value (a scrape gap recorded as NaN) are skipped, and
    n counts only the samples used. A perfectly flat series has r^2 = 1: the line explains it.
    """
    pts = [(t, v) for t, v in samples if math.isfinite(t) and math.isfinite(v)]
    if len(pts) < MIN_SAMPLES:
        return None
    ts = [t for t, _ in pts]
    vs = [v for _, v in pts]
    span = max(ts) - min(ts)
    if span <= 0:
        return None
    slope, intercept = statistics.linear_regression(ts, vs)
    mean_v = statistics.fmean(vs)
    ss_tot = math.fsum((v - mean_v) ** 2 for v in vs)
    ss_res = math.fsum((v - (slope * t + intercept)) ** 2 for t, v in pts)
    r2 = 1.0 if ss_tot == 0 else max(0.0, 1.0 - ss_res / ss_tot)
    return Trend(slope_per_s=slope, intercept=intercept, r2=r2, n=len(pts), span_s=span)


def time_to_exhaustion(trend: Trend, now_t: float, capacity: float) -> float | None:
    """Seconds from now_t until the fitted line reaches capacity.

    0.0 when the fitted value at now_t is already at or over capacity (exhausted now, even if
    the line is falling); None when the line is flat or falling (never).
    """
    current = trend.value_at(now_t)
    if current >= capacity:
        return 0.0
    if trend.slope_per_s <= 0:
        return None
    return (capacity - current) / trend.slope_per_s


@dataclass(frozen=True)
class Confidence:
    """How far to trust the trend line: r2 is None when there is no fit."""

    n: int
    r2: float | None
    level: ConfidenceLevel


def confidence(n: int, r2: float | None) -> Confidence:
    """Level from sample count and r^2 by CONFIDENCE_RULES; "none" when there is no fit."""
    if r2 is None or n < MIN_SAMPLES:
        return Confidence(n=n, r2=r2, level="none")
    for level, min_n, min_r2 in CONFIDENCE_RULES:
        if n >= min_n and r2 >= min_r2:
            return Confidence(n=n, r2=r2, level=level)
    return Confidence(n=n, r2=r2, level="low")


@dataclass(frozen=True)
class Prediction:
    """A forecast for one resource. slope_per_hour is None when there was no fit at all."""

    resource: str
    slope_per_hour: float | None
    exhausted_in_s: float | None
    confidence: Confidence


def predict(
    resource: str,
    samples: Sequence[tuple[float, float]],
    capacity: float,
    now_t: float,
    window_s: float | None = DEFAULT_WINDOW_S,
) -> Prediction:
    """Fit the samples within window_s before now_t and forecast when capacity runs out.

    Samples after now_t are ignored: they cannot be real, and would skew the line.
    """
    start = -math.inf if window_s is None else now_t - window_s
    used = [(t, v) for t, v in samples if start <= t <= now_t]
    trend = fit(used)
    if trend is None:
        return Prediction(resource, None, None, confidence(len(used), None))
    return Prediction(
        resource=resource,
        slope_per_hour=trend.slope_per_s * 3600.0,
        exhausted_in_s=time_to_exhaustion(trend, now_t, capacity),
        confidence=confidence(trend.n, trend.r2),
    )
