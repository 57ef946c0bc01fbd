"""Console charts: the measured points, the least-squares trend drawn ahead, the limit."""

from __future__ import annotations

import json

from stoker.web.charts import RANGES, usage_chart


def test_trend_is_drawn_ahead_with_the_time_to_the_limit() -> None:
    now = 10_000.0
    samples = [(now - 600 + 60 * i, 100.0 + 10 * i) for i in range(11)]  # +600/h, exactly
    chart = usage_chart("m", "memory", "count", samples, now, RANGES["1h"], limit=1000.0)
    assert chart.points == 11
    labels = [s.label for s in chart.series]
    assert labels == ["memory", "trend", "limit"]
    measured, trend, limit = (s.values for s in chart.series)
    assert len(chart.xs) > 11 and chart.xs[-1] > now  # drawn past now
    assert measured[-1] is None and trend[-1] is not None and trend[-1] > 200
    assert set(limit) == {1000.0}
    # 200 now, +600 per hour: the limit of 1000 in 80 minutes (11 samples: medium confidence)
    assert "reaches 1000 in 1h20m" in chart.note and "confidence medium" in chart.note
    data = json.loads(chart.to_json())
    assert len(data["data"]) == 4 and data["series"][1]["dashed"] is True


def test_too_few_samples_draw_no_trend() -> None:
    chart = usage_chart("c", "CPU", "percent", [(1.0, 5.0), (2.0, None)], 3.0, 3600)
    assert chart.points == 1 and [s.label for s in chart.series] == ["CPU"]
    assert "too few" in chart.note
    empty = usage_chart("c", "CPU", "percent", [], 3.0, 3600, limit=100)
    assert empty.points == 0 and empty.xs == [] and empty.note == "no samples yet"
