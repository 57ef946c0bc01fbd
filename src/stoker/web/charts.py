"""Time-series charts for the console: measured points, the fitted trend drawn on past the
last sample, and the limit it runs towards.

The browser draws them with uPlot from the JSON built here; the trend and the time to
exhaustion come from ``domain.trend`` (the same least-squares fit the API's predictions
use), so the chart and ``stoker resources`` never disagree.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from stoker.domain import trend
from stoker.domain.units import format_duration, format_size

Unit = Literal["percent", "bytes", "cores", "count"]

#: the trend is drawn on past the last sample for half the time the samples span, at most
#: this share of the shown range (a forecast reaches no further than its evidence)
FORECAST_SHARE = 0.25
FORECAST_POINTS = 4

#: the ranges a chart can show, by the name in its URL
RANGES: dict[str, float] = {"1h": 3600.0, "24h": 86_400.0, "7d": 7 * 86_400.0}


@dataclass(frozen=True)
class Series:
    label: str
    values: list[float | None]
    dashed: bool = False
    colour: str = "#2563eb"


@dataclass(frozen=True)
class Chart:
    id: str
    title: str
    unit: Unit
    xs: list[float]
    series: list[Series] = field(default_factory=list)
    #: one line under the chart: the trend, and when it reaches the limit, with confidence
    note: str = ""
    #: measured points (a chart without any says so instead of drawing)
    points: int = 0

    def to_json(self) -> str:
        """What the page's chart script reads: uPlot's columns and each series' looks."""
        return json.dumps(
            {
                "title": self.title,
                "unit": self.unit,
                "data": [self.xs, *(s.values for s in self.series)],
                "series": [
                    {"label": s.label, "dashed": s.dashed, "colour": s.colour} for s in self.series
                ],
            },
            separators=(",", ":"),
        )


def show(value: float, unit: Unit) -> str:
    if unit == "bytes":
        return format_size(int(value))
    if unit == "percent":
        return f"{value:.1f}%"
    if unit == "cores":
        return f"{value:.2f} cores"
    return f"{value:g}"


def usage_chart(
    chart_id: str,
    title: str,
    unit: Unit,
    samples: Sequence[tuple[float, float | None]],
    now_t: float,
    range_s: float,
    limit: float | None = None,
    limit_label: str = "limit",
) -> Chart:
    """``samples`` (time, value or None) as a chart over the last ``range_s`` before
    ``now_t``, with the trend fitted over them and drawn ahead, and ``limit`` as a line."""
    shown = [(t, v) for t, v in samples if now_t - range_s <= t <= now_t]
    known = [(t, v) for t, v in shown if v is not None and math.isfinite(v)]
    xs = [t for t, _ in shown]
    measured: list[float | None] = [v for _, v in shown]
    fitted = trend.fit(known)
    series = [Series(title, measured)]
    note = f"{len(known)} samples: too few for a trend" if known else "no samples yet"
    if fitted is not None and xs:
        horizon = min(range_s * FORECAST_SHARE, fitted.span_s / 2)
        ahead = [now_t + horizon * k / FORECAST_POINTS for k in range(1, FORECAST_POINTS + 1)]
        xs = xs + ahead
        measured.extend([None] * len(ahead))
        line: list[float | None] = [max(0.0, fitted.value_at(t)) for t in xs]
        series.append(Series("trend", line, dashed=True, colour="#d97706"))
        note = _trend_note(fitted, now_t, unit, limit)
    if limit is not None and xs:
        series.append(Series(limit_label, [limit] * len(xs), dashed=True, colour="#dc2626"))
    return Chart(chart_id, title, unit, xs, series, note, points=len(known))


def _trend_note(fitted: trend.Trend, now_t: float, unit: Unit, limit: float | None) -> str:
    per_hour = fitted.slope_per_s * 3600
    sign = "+" if per_hour >= 0 else "-"
    confidence = trend.confidence(fitted.n, fitted.r2).level
    text = f"trend {sign}{show(abs(per_hour), unit)}/h (confidence {confidence})"
    if limit is None:
        return text
    left = trend.time_to_exhaustion(fitted, now_t, limit)
    if left is None:
        return f"{text}; not growing towards the limit of {show(limit, unit)}"
    if left == 0:
        return f"{text}; at the limit of {show(limit, unit)} now"
    return f"{text}; reaches {show(limit, unit)} in {format_duration(max(1.0, left))}"
