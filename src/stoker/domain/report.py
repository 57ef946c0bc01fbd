"""Usage-report arithmetic: periods, uptime from state transitions, totals from samples.

Pure: every input (transitions, samples, the period, "now") is a parameter. The rule the
whole module keeps: a figure with no data stays ``None`` ("no data"), and nothing is
estimated from a single moment. A rate integrates only over intervals between two real
samples that are close enough to trust (see ``max_gap_s``); a gap is reported as lost
coverage, never filled in.
"""

from __future__ import annotations

import calendar
import itertools
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Literal

Period = Literal["daily", "weekly", "monthly"]
PERIODS: tuple[Period, ...] = ("daily", "weekly", "monthly")

GIB = 1024**3


# ------------------------------------------------------------------------------- periods


@dataclass(frozen=True)
class ReportPeriod:
    period: Period
    #: the file name stem: daily-2026-03-02, weekly-2026-W09, monthly-2026-03
    label: str
    start: datetime  # UTC, inclusive
    end: datetime  # UTC, exclusive

    @property
    def seconds(self) -> float:
        return (self.end - self.start).total_seconds()


def _local_midnight(day: date, tz: tzinfo) -> datetime:
    return datetime.combine(day, time(0), tzinfo=tz).astimezone(UTC)


def period_for(period: Period, day: date, tz: tzinfo) -> ReportPeriod:
    """The daily, ISO-weekly or monthly period containing ``day``, bounded at local midnight
    in ``tz`` (so a DST day is 23 or 25 hours long, as the operator's calendar says)."""
    if period == "daily":
        first, after = day, day + timedelta(days=1)
        label = f"daily-{day.isoformat()}"
    elif period == "weekly":
        first = day - timedelta(days=day.isoweekday() - 1)
        after = first + timedelta(days=7)
        year, week, _ = day.isocalendar()
        label = f"weekly-{year}-W{week:02d}"
    elif period == "monthly":
        first = day.replace(day=1)
        after = first + timedelta(days=calendar.monthrange(day.year, day.month)[1])
        label = f"monthly-{day.year}-{day.month:02d}"
    else:
        raise ValueError(f"unknown report period {period!r}; use one of {', '.join(PERIODS)}")
    return ReportPeriod(period, label, _local_midnight(first, tz), _local_midnight(after, tz))


def last_complete_day(period: Period, now: datetime, tz: tzinfo) -> date:
    """A day inside the latest period that has fully ended at ``now`` (what a report run
    shortly after midnight should cover: yesterday, last week, last month)."""
    today = now.astimezone(tz).date()
    if period == "daily":
        return today - timedelta(days=1)
    if period == "weekly":
        return today - timedelta(days=today.isoweekday())  # last Sunday
    if period == "monthly":
        return today.replace(day=1) - timedelta(days=1)
    raise ValueError(f"unknown report period {period!r}; use one of {', '.join(PERIODS)}")


# ------------------------------------------------------------------------------- uptime


@dataclass(frozen=True)
class StateTime:
    """Seconds the VM was observed (it existed) and seconds it was running in a window."""

    observed_s: float
    running_s: float

    @property
    def uptime_percent(self) -> float | None:
        if self.observed_s <= 0:
            return None
        return 100.0 * self.running_s / self.observed_s


def time_in_state(
    transitions: Iterable[tuple[datetime, str]],
    start: datetime,
    end: datetime,
    states: Collection[str] = ("running",),
) -> StateTime:
    """Time spent in any of ``states`` within ``[start, end)`` from (at, to_state)
    transitions (``running_s`` counts it).

    The state at ``start`` is the last transition before it; before a VM's first
    transition it did not exist, so that time is not observed (neither up nor down).
    """
    points = sorted(transitions)
    observed = running = 0.0
    current: str | None = None
    cursor = start
    for at, to_state in points:
        if at <= start:
            current = to_state
            continue
        if at >= end:
            break
        if current is not None:
            span = (at - cursor).total_seconds()
            observed += span
            if current in states:
                running += span
        current, cursor = to_state, at
    if current is not None and end > cursor:
        span = (end - cursor).total_seconds()
        observed += span
        if current in states:
            running += span
    return StateTime(observed_s=observed, running_s=running)


def count_into(
    transitions: Iterable[tuple[datetime, str]], start: datetime, end: datetime, state: str
) -> int:
    return sum(1 for at, to_state in transitions if start <= at < end and to_state == state)


# ------------------------------------------------------------------------------ samples


@dataclass(frozen=True)
class Point:
    """One sample of one series: t in epoch seconds, resolution_s the interval it covers."""

    t: float
    value: float
    resolution_s: float = 0.0


def max_gap_s(a: Point, b: Point, floor_s: float = 60.0) -> float:
    """How far apart two samples may be and still bound a trusted interval: three sampling
    intervals (a missed sample or two), never less than ``floor_s``."""
    return max(3.0 * max(a.resolution_s, b.resolution_s), floor_s)


@dataclass(frozen=True)
class Integral:
    """The integral of a series over the covered intervals, and how long they were."""

    total: float
    covered_s: float
    samples: int

    @property
    def average(self) -> float | None:
        return self.total / self.covered_s if self.covered_s > 0 else None


def integrate(points: Sequence[Point], mode: Literal["interval", "trapezoid"]) -> Integral | None:
    """Integrate a gauge over time, skipping gaps wider than ``max_gap_s``.

    ``interval``: each sample is the average over the interval that ends at it (a CPU
    percentage computed from counter deltas), so it counts for that interval exactly.
    ``trapezoid``: a gauge read at an instant (resident memory), averaged between neighbours.
    None with fewer than two samples or no trusted interval: one sample is a moment, not a
    duration.
    """
    pts = sorted(points, key=lambda p: p.t)
    if len(pts) < 2:
        return None
    total = covered = 0.0
    for a, b in itertools.pairwise(pts):
        dt = b.t - a.t
        if dt <= 0 or dt > max_gap_s(a, b):
            continue
        total += (b.value if mode == "interval" else (a.value + b.value) / 2.0) * dt
        covered += dt
    if covered <= 0:
        return None
    return Integral(total=total, covered_s=covered, samples=len(pts))


def counter_increase(points: Sequence[Point]) -> float | None:
    """How much a cumulative counter grew across the samples; a drop is a reset (the VMM
    restarted), after which the new value is what was counted since. None below 2 samples."""
    pts = sorted(points, key=lambda p: p.t)
    if len(pts) < 2:
        return None
    increase = 0.0
    for a, b in itertools.pairwise(pts):
        increase += b.value - a.value if b.value >= a.value else b.value
    return increase


@dataclass(frozen=True)
class GaugeStats:
    peak: float
    average: float
    samples: int


def gauge_stats(
    points: Sequence[Point], mode: Literal["interval", "trapezoid"]
) -> GaugeStats | None:
    """Peak sample and time-weighted average; None when ``integrate`` has nothing to say."""
    integral = integrate(points, mode)
    if integral is None or integral.average is None:
        return None
    return GaugeStats(
        peak=max(p.value for p in points), average=integral.average, samples=len(points)
    )


def series(rows: Iterable[object], column: str) -> list[Point]:
    """Points of one column from sample rows with ``t`` and ``resolution_s``; missing
    (None) readings are left out rather than read as zero."""
    out = []
    for row in rows:
        value = getattr(row, column)
        if value is not None:
            out.append(Point(float(row.t), float(value), float(row.resolution_s)))  # type: ignore[attr-defined]
    return out


# ---------------------------------------------------------------------------- rendering


def fmt(value: float | None, unit: str = "", digits: int = 2) -> str:
    if value is None:
        return "no data"
    return f"{value:.{digits}f}{(' ' + unit) if unit else ''}"


def fmt_bytes(value: float | None) -> str:
    if value is None:
        return "no data"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{size:.2f} TiB"  # pragma: no cover
