"""Cron schedules: the seed's expressions, Debian day-matching, DST, misfires, staggering.

Expected times are written as local wall times in the schedule's zone and compared in
UTC, which is what the functions return.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stoker.domain.cron import (
    ALIASES,
    fires_between,
    misfire_decision,
    missed_fires,
    next_fire,
    plan_misfires,
    stagger_offset,
    validate_cron,
)

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def at(tz: tzinfo, text: str, fold: int = 0) -> datetime:
    """A wall time in ``tz`` (ISO text without offset)."""
    return datetime.fromisoformat(text).replace(tzinfo=tz, fold=fold)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# 2026-11-20 is a Friday; Berlin is on CET (+01:00) in November.
NEXT_FIRE_TABLE = [
    # seed: "start web-server at 8 AM weekdays" -- never fired in the original
    ("0 8 * * 1-5", "2026-11-20T09:00", "2026-11-23T08:00"),  # Fri after 08:00 -> Mon
    ("0 8 * * 1-5", "2026-11-21T10:00", "2026-11-23T08:00"),  # Saturday -> Monday
    ("0 8 * * 1-5", "2026-11-23T07:59", "2026-11-23T08:00"),
    ("0 8 * * 1-5", "2026-11-23T08:00", "2026-11-24T08:00"),  # strictly after
    ("0 8 * * 1-5", "2026-11-23T08:00:00.5", "2026-11-24T08:00"),
    # seed: "stop at 6 PM"
    ("0 18 * * *", "2026-11-20T09:00", "2026-11-20T18:00"),
    ("0 18 * * *", "2026-11-20T18:00", "2026-11-21T18:00"),
    # day-of-month OR day-of-week when both are restricted (Debian cron)
    ("0 0 13 * 5", "2026-12-05T00:00", "2026-12-11T00:00"),  # Friday the 11th
    ("0 0 13 * 5", "2026-12-12T00:00", "2026-12-13T00:00"),  # Sunday the 13th
    ("0 0 13 * 5", "2026-12-13T00:00", "2026-12-18T00:00"),  # next Friday
    ("0 0 13 * *", "2026-12-12T00:00", "2026-12-13T00:00"),  # * day-of-week: AND
    ("0 0 */2 * 5", "2026-12-05T01:00", "2026-12-11T00:00"),  # "*/2" is a star: odd AND Fri
    # steps, lists, names
    ("*/15 * * * *", "2026-11-20T10:07", "2026-11-20T10:15"),
    ("*/15 * * * *", "2026-11-20T10:45", "2026-11-20T11:00"),
    ("5,35 */6 * * *", "2026-11-20T06:36", "2026-11-20T12:05"),
    ("0 9 * * MON-FRI", "2026-11-21T00:00", "2026-11-23T09:00"),
    ("0 9 * * mon,wed", "2026-11-23T09:00", "2026-11-25T09:00"),
    ("0 12 1 JAN-MAR *", "2026-11-20T00:00", "2027-01-01T12:00"),
    ("0 0 * * 7", "2026-11-20T00:00", "2026-11-22T00:00"),  # 7 is Sunday too
    ("0 0 29 2 *", "2026-03-01T00:00", "2028-02-29T00:00"),
    # aliases
    ("@hourly", "2026-11-20T10:07", "2026-11-20T11:00"),
    ("@daily", "2026-11-20T13:00", "2026-11-21T00:00"),
    ("@midnight", "2026-11-20T13:00", "2026-11-21T00:00"),
    ("@weekly", "2026-11-20T13:00", "2026-11-22T00:00"),
    ("@monthly", "2026-11-20T13:00", "2026-12-01T00:00"),
    ("@yearly", "2026-11-20T13:00", "2027-01-01T00:00"),
    ("@annually", "2026-11-20T13:00", "2027-01-01T00:00"),
]


@pytest.mark.parametrize(("expr", "after", "expected"), NEXT_FIRE_TABLE)
def test_next_fire_table(expr: str, after: str, expected: str) -> None:
    got = next_fire(expr, at(BERLIN, after), BERLIN)
    assert got == at(BERLIN, expected)
    assert got.tzinfo is UTC


def test_next_fire_in_utc_and_from_any_offset() -> None:
    assert next_fire("0 8 * * 1-5", utc("2026-11-20T09:00"), UTC) == utc("2026-11-23T08:00")
    # `after` may be given in any zone; the schedule's zone is what counts.
    after = at(NEW_YORK, "2026-11-20T03:30")  # = 09:30 Berlin
    assert next_fire("0 18 * * *", after, BERLIN) == at(BERLIN, "2026-11-20T18:00")


# --- DST -------------------------------------------------------------------------------


def test_berlin_spring_forward_fixed_time_runs_once_after_the_jump() -> None:
    # 2026-03-29: 02:00 CET -> 03:00 CEST; 02:30 does not exist. Debian cron (and
    # cronsim) run the job at the first minute after the jump, 03:00 CEST.
    first = next_fire("30 2 * * *", at(BERLIN, "2026-03-28T12:00"), BERLIN)
    assert first == utc("2026-03-29T01:00") == at(BERLIN, "2026-03-29T03:00")
    assert next_fire("30 2 * * *", first, BERLIN) == at(BERLIN, "2026-03-30T02:30")
    day = fires_between(
        "30 2 * * *", at(BERLIN, "2026-03-29T00:00"), at(BERLIN, "2026-03-30T00:00"), BERLIN
    )
    assert day == [utc("2026-03-29T01:00")]


def test_berlin_fall_back_fixed_time_fires_exactly_once() -> None:
    # 2026-10-25: 03:00 CEST -> 02:00 CET; 02:30 happens twice, the job runs in the
    # first pass only (CEST, 00:30 UTC).
    day = fires_between(
        "30 2 * * *", at(BERLIN, "2026-10-25T00:00"), at(BERLIN, "2026-10-26T00:00"), BERLIN
    )
    assert day == [utc("2026-10-25T00:30")]
    # Asked from inside the repeated hour (02:10 CET, after the run), the next fire is
    # tomorrow, not the 02:30 that already ran.
    inside = at(BERLIN, "2026-10-25T02:10", fold=1)
    assert inside.astimezone(UTC) == utc("2026-10-25T01:10")  # == is False across zones
    assert next_fire("30 2 * * *", inside, BERLIN) == at(BERLIN, "2026-10-26T02:30")
    assert next_fire("30 2 * * *", at(BERLIN, "2026-10-26T02:30"), BERLIN) == at(
        BERLIN, "2026-10-27T02:30"
    )


def test_wildcard_jobs_follow_real_time_across_dst() -> None:
    fall = fires_between("*/30 * * * *", utc("2026-10-24T23:50"), utc("2026-10-25T02:00"), BERLIN)
    # 02:00 and 02:30 CEST, then 02:00 and 02:30 CET, then 03:00 CET: every real half hour.
    assert fall == [utc(f"2026-10-25T{h}") for h in ("00:00", "00:30", "01:00", "01:30", "02:00")]
    spring = fires_between("*/30 * * * *", utc("2026-03-29T00:20"), utc("2026-03-29T01:40"), BERLIN)
    # 01:30 CET, then 03:00 and 03:30 CEST: 02:00 and 02:30 never exist.
    assert spring == [utc("2026-03-29T00:30"), utc("2026-03-29T01:00"), utc("2026-03-29T01:30")]


def test_new_york_transitions() -> None:
    # Spring forward 2026-03-08 02:00 EST -> 03:00 EDT.
    assert next_fire("30 2 * * *", at(NEW_YORK, "2026-03-07T12:00"), NEW_YORK) == utc(
        "2026-03-08T07:00"
    )
    # Fall back 2026-11-01 02:00 EDT -> 01:00 EST; 01:30 happens twice, runs once (EDT).
    day = fires_between(
        "30 1 * * *", at(NEW_YORK, "2026-11-01T00:00"), at(NEW_YORK, "2026-11-02T00:00"), NEW_YORK
    )
    assert day == [utc("2026-11-01T05:30")]


# --- validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "normal"),
    [
        ("0 8 * * 1-5", "0 8 * * 1-5"),
        ("  0   8 * *   mon-fri ", "0 8 * * MON-FRI"),
        ("*/15 0-23/2 1,15 jan,jul *", "*/15 0-23/2 1,15 JAN,JUL *"),
        ("@Daily", "0 0 * * *"),
        *[(alias, form) for alias, form in ALIASES.items()],
    ],
)
def test_validate_normalises(expr: str, normal: str) -> None:
    assert validate_cron(expr) == normal
    assert validate_cron(normal) == normal


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("", "it is empty"),
        ("* * * *", "it has 4 fields, cron needs exactly 5"),
        ("0 8 * * 1-5 *", "it has 6 fields"),  # cronsim would read this as seconds-first!
        ("61 * * * *", "minute field: 61 is out of range 0-59"),
        ("0 24 * * *", "hour field: 24 is out of range 0-23"),
        ("0 0 0 * *", "day-of-month field: 0 is out of range 1-31"),
        ("0 0 * 13 *", "month field: 13 is out of range 1-12"),
        ("0 0 * * 8", "day-of-week field: 8 is out of range 0-7"),
        ("0 0 * FOO *", "month field: 'FOO' is not a number 1-12 or a name JAN-DEC"),
        ("0 0 * MON *", "month field: 'MON' is not a number"),
        ("0 0 * * FUNDAY", "day-of-week field: 'FUNDAY' is not a number 0-7 or a name SUN-SAT"),
        ("x * * * *", "minute field: 'X' is not a number 0-59"),
        ("5-1 * * * *", "range '5-1' runs backwards"),
        ("*/0 * * * *", "step in '*/0' must be at least 1"),
        ("5/15 * * * *", "write '5-59/15' or '*/15'"),
        ("1,,2 * * * *", "minute field: '' is not"),
        ("0 0 L * *", "L and W are not standard cron syntax"),
        ("0 0 * * MON#2", "# and ? are not standard cron syntax"),
        ("0 0 ? * *", "# and ? are not standard cron syntax"),
        ("0 0 31 2 *", "never fires"),
        ("0 0 30 2 *", "never fires"),
        ("@reboot", "@reboot is not supported"),
        ("@every 5m", "unknown alias"),
    ],
)
def test_validate_rejects_with_clear_message(expr: str, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        validate_cron(expr)
    assert message in str(exc.value)
    assert str(exc.value).startswith(f"invalid cron expression {expr!r}")


def test_other_functions_validate_too() -> None:
    with pytest.raises(ValueError, match="6 fields"):
        next_fire("0 8 * * 1-5 *", utc("2026-01-01T00:00"), UTC)
    with pytest.raises(ValueError, match="timezone-aware"):
        next_fire("0 8 * * *", datetime(2026, 1, 1), UTC)
    with pytest.raises(ValueError, match="timezone-aware"):
        fires_between("0 8 * * *", datetime(2026, 1, 1), utc("2026-01-02T00:00"), UTC)


# --- ranges ----------------------------------------------------------------------------


def test_fires_between_is_half_open_and_capped() -> None:
    start, end = utc("2026-11-20T10:00"), utc("2026-11-20T11:00")
    got = fires_between("*/15 * * * *", start, end, UTC)
    assert got == [utc(f"2026-11-20T{t}") for t in ("10:15", "10:30", "10:45", "11:00")]
    assert fires_between("*/15 * * * *", end, start, UTC) == []
    many = fires_between("* * * * *", utc("2026-01-01T00:00"), utc("2027-01-01T00:00"), UTC)
    assert len(many) == 10_000 and many[0] == utc("2026-01-01T00:01")
    assert len(fires_between("* * * * *", start, end, UTC, limit=7)) == 7


def test_missed_fires_after_downtime() -> None:
    # Agent down from Friday 09:00 to Wednesday 08:01: Mon, Tue, Wed 08:00 came due.
    last_checked = at(BERLIN, "2026-11-20T09:00")
    now = at(BERLIN, "2026-11-25T08:01")
    fires = missed_fires("0 8 * * 1-5", last_checked, now, BERLIN)
    assert fires == [at(BERLIN, f"2026-11-{d}T08:00") for d in (23, 24, 25)]
    run, missed = plan_misfires(fires, now, grace_s=300)
    assert run == at(BERLIN, "2026-11-25T08:00")
    assert missed == fires[:2]
    # A fire exactly at `now` is due.
    assert missed_fires("0 8 * * 1-5", last_checked, at(BERLIN, "2026-11-23T08:00"), BERLIN) == [
        at(BERLIN, "2026-11-23T08:00")
    ]


def test_missed_fires_long_outage_keeps_the_latest_and_is_quick() -> None:
    t0 = time.perf_counter()
    fires = missed_fires("* * * * *", utc("2025-01-01T00:00"), utc("2026-06-01T12:34:56"), BERLIN)
    assert time.perf_counter() - t0 < 5
    assert len(fires) == 10_000
    assert fires[-1] == utc("2026-06-01T12:34")
    assert fires == sorted(fires)


def test_missed_fires_across_fall_back_from_inside_the_repeated_hour() -> None:
    # Checked at 02:10 CET (second pass): the 02:30 CEST run earlier is found.
    now = at(BERLIN, "2026-10-25T02:10", fold=1)
    got = missed_fires("30 2 * * *", utc("2026-10-24T12:00"), now, BERLIN)
    assert got == [utc("2026-10-25T00:30")]


EXPRS = [
    "30 2 * * *",
    "0,30 1-3 * * *",
    "*/20 * * * *",
    "0 8 * * 1-5",
    "15 */2 * * *",
    "0 0 13 * 5",
    "59 23 * * *",
]


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(EXPRS),
    st.sampled_from([UTC, BERLIN, NEW_YORK, ZoneInfo("Australia/Lord_Howe")]),
    st.integers(0, 400 * 24 * 60),
    st.integers(0, 4 * 24 * 60),
)
def test_forward_and_backward_agree(expr: str, tz: tzinfo, start_min: int, span_min: int) -> None:
    start = utc("2025-12-01T00:00") + timedelta(minutes=start_min, seconds=7)
    end = start + timedelta(minutes=span_min)
    forward = fires_between(expr, start, end, tz)
    assert forward == missed_fires(expr, start, end, tz)
    assert forward == sorted(set(forward))
    assert all(start < t <= end for t in forward)
    # Chaining next_fire gives the same sequence.
    t = start
    for expected in forward:
        t = next_fire(expr, t, tz)
        assert t == expected


# --- misfires --------------------------------------------------------------------------


def test_misfire_decision() -> None:
    sched = utc("2026-11-23T08:00")
    assert misfire_decision(sched, sched + timedelta(seconds=240), 300) == "run"
    assert misfire_decision(sched, sched + timedelta(seconds=300), 300) == "run"
    assert misfire_decision(sched, sched + timedelta(seconds=301), 300) == "missed"
    assert misfire_decision(sched, sched - timedelta(seconds=5), 0) == "run"
    assert misfire_decision(sched, sched + timedelta(hours=9), 300) == "missed"
    with pytest.raises(ValueError, match="grace_s"):
        misfire_decision(sched, sched, -1)
    with pytest.raises(ValueError, match="grace_s"):
        misfire_decision(sched, sched, math.nan)
    with pytest.raises(ValueError, match="timezone-aware"):
        misfire_decision(datetime(2026, 11, 23, 8), sched, 1)


def test_plan_misfires() -> None:
    week = [utc(f"2026-11-{d}T08:00") for d in (23, 24, 25, 26, 27)]
    now = utc("2026-11-27T08:02")
    assert plan_misfires(reversed(week), now, 300) == (week[-1], week[:-1])
    assert plan_misfires(week, utc("2026-11-27T09:00"), 300) == (None, week)
    assert plan_misfires([], now, 300) == (None, [])
    # Not yet due: left out of both.
    assert plan_misfires([*week, utc("2026-11-30T08:00")], now, 300) == (week[-1], week[:-1])
    assert plan_misfires([week[0], week[0]], utc("2026-11-23T08:00"), 0) == (week[0], [])
    # The same instant in two zones is one fire (fold=1 makes == False across zones).
    same = at(BERLIN, "2026-10-25T02:30", fold=1)
    run, missed = plan_misfires([same, same.astimezone(UTC)], same, 0)
    assert run == utc("2026-10-25T01:30") and missed == []
    with pytest.raises(ValueError, match="timezone-aware"):
        plan_misfires([datetime(2026, 1, 1)], now, 0)


# --- stagger ---------------------------------------------------------------------------


def test_stagger_is_deterministic_and_in_range() -> None:
    a = stagger_offset("nightly-snapshot", "web-1", 600.0)
    assert a == stagger_offset("nightly-snapshot", "web-1", 600.0)
    assert 0 <= a < 600
    # Pinned: the slot must not move between releases or machines.
    assert a == pytest.approx(PINNED_WEB1, abs=1e-9)
    assert stagger_offset("nightly-snapshot", "web-2", 600.0) != a
    assert stagger_offset("other", "web-1", 600.0) != a
    # Ids are length-prefixed, so shifting a separator between them changes the result.
    assert stagger_offset("a:b", "c", 100.0) != stagger_offset("a", "b:c", 100.0)
    assert stagger_offset("s", "t", 0.0) == 0.0
    assert 0 <= stagger_offset("s", "t", 1e-300) < 1e-300
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="spread_s"):
            stagger_offset("s", "t", bad)


# sha256(b"16:nightly-snapshot:web-1"), top 53 bits, scaled to 600 s.
PINNED_WEB1 = 446.92713050633705


def test_stagger_spreads_roughly_uniformly() -> None:
    spread = 60.0
    offsets = [stagger_offset("morning-start", f"vm-{i}", spread) for i in range(10_000)]
    assert all(0 <= o < spread for o in offsets)
    bins = [0] * 10
    for o in offsets:
        bins[int(o / spread * 10)] += 1
    assert min(bins) > 850 and max(bins) < 1150, bins
    assert abs(sum(offsets) / len(offsets) - spread / 2) < 1.0
