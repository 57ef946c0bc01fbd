"""Cron schedules: validation, next fire times, DST, staggering and missed runs.

The scripts stoker replaces matched cron on minute and hour only, so ``0 8 * * 1-5``
("08:00 on weekdays") never fired. Here the whole expression is evaluated by ``cronsim``,
which follows Debian cron:

* Five fields, ``minute hour day-of-month month day-of-week``; names (``JAN``, ``MON``)
  in any case, ranges, lists and steps; Sunday is 0 or 7. ``@hourly``, ``@daily``,
  ``@midnight``, ``@weekly``, ``@monthly``, ``@yearly`` and ``@annually`` are mapped to
  their five-field forms here (cronsim has none of them). ``@reboot`` is rejected: the
  agent's own start is not a schedule. cronsim's extensions (a seconds field, ``L``,
  ``W``, ``#``, ``?``) and ``N/step`` without a range are rejected too, so a stored
  schedule means the same thing to cron, systemd users and stoker.
* When both day-of-month and day-of-week are restricted (neither starts with ``*``) a
  day matches if EITHER matches: ``0 0 13 * 5`` fires on every 13th and every Friday.
* Times are wall-clock times in the schedule's zone ``tz``. Across DST changes, as in
  Debian cron: a job at a fixed time (minute and hour fields both without ``*``) that
  falls into the hour skipped in spring runs once, at the first valid minute after the
  jump (Berlin: ``30 2 * * *`` runs at 03:00 CEST on that day); one that falls into the
  hour repeated in autumn runs once, in the first pass (02:30 CEST, not again at
  02:30 CET). Jobs with ``*`` in the minute or hour field follow real time: ``*/30``
  fires at 02:00 and 02:30 in both passes of the repeated hour and skips the hour that
  does not exist.

All results are timezone-aware UTC datetimes. Pure: no I/O and no clock reading; "now"
is always a parameter.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Literal

from cronsim import CronSim, CronSimError

__all__ = [
    "ALIASES",
    "MAX_FIRES",
    "fires_between",
    "misfire_decision",
    "missed_fires",
    "next_fire",
    "plan_misfires",
    "stagger_offset",
    "validate_cron",
]

MAX_FIRES = 10_000
"""Default cap on how many fire times one call lists, so a bad range cannot hang a tick."""

ALIASES: dict[str, str] = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}

_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
# name, lowest, highest, names (index + offset = value)
_FIELDS: tuple[tuple[str, int, int, tuple[str, ...], int], ...] = (
    ("minute", 0, 59, (), 0),
    ("hour", 0, 23, (), 0),
    ("day-of-month", 1, 31, (), 0),
    ("month", 1, 12, _MONTHS, 1),
    ("day-of-week", 0, 7, _DAYS, 0),
)
_ITEM_RE = re.compile(r"(?P<base>\*|[0-9A-Z]+(?:-[0-9A-Z]+)?)(?:/(?P<step>[0-9]+))?")
_FORMAT = "minute hour day-of-month month day-of-week"
# Wider than any DST shift (Troll station's is 2 h): see _backward.
_FOLD_MARGIN = timedelta(hours=3)


def _bad(expr: str, why: str) -> ValueError:
    return ValueError(f"invalid cron expression {expr!r}: {why}")


def _value(
    expr: str, field: str, text: str, lo: int, hi: int, names: tuple[str, ...], off: int
) -> int:
    if text.isdigit():
        v = int(text)
    elif text in names:
        v = names.index(text) + off
    elif field.startswith("day") and any(c in text for c in "LW"):
        raise _bad(expr, f"{field} field: {text!r}: L and W are not standard cron syntax")
    else:
        allowed = f"a number {lo}-{hi}"
        if names:
            allowed += f" or a name {names[0]}-{names[-1]}"
        raise _bad(expr, f"{field} field: {text!r} is not {allowed}")
    if not lo <= v <= hi:
        raise _bad(expr, f"{field} field: {v} is out of range {lo}-{hi}")
    return v


def _check_field(expr: str, spec: tuple[str, int, int, tuple[str, ...], int], text: str) -> None:
    field, lo, hi, names, off = spec
    for item in text.split(","):
        m = _ITEM_RE.fullmatch(item)
        if m is None:
            if any(c in item for c in "LW#?"):
                raise _bad(
                    expr,
                    f"{field} field {text!r}: L, W, # and ? are not standard cron syntax",
                )
            raise _bad(
                expr,
                f"{field} field: {item!r} is not '*', a value, a range 'a-b', or one "
                "of those with '/step'",
            )
        base, step = m.group("base"), m.group("step")
        if step is not None and int(step) == 0:
            raise _bad(expr, f"{field} field: step in {item!r} must be at least 1")
        if base == "*":
            continue
        first, dash, last = base.partition("-")
        a = _value(expr, field, first, lo, hi, names, off)
        if dash:
            b = _value(expr, field, last, lo, hi, names, off)
            if b < a:
                raise _bad(expr, f"{field} field: range {base!r} runs backwards")
        elif step is not None:
            raise _bad(
                expr,
                f"{field} field: {item!r} needs a range before the step; "
                f"write '{first}-{hi}/{step}' or '*/{step}'",
            )


def validate_cron(expr: str) -> str:
    """Check a cron expression and return its normal form (5 fields, upper case).

    ``@`` aliases come back as their 5-field form. Raises ``ValueError`` naming the field
    and what is wrong with it, because cronsim's own messages ("Bad minute") do not say.
    """
    text = " ".join(expr.split()).upper()
    if not text:
        raise _bad(expr, f"it is empty; give 5 fields ({_FORMAT}) or an alias like @daily")
    if text.startswith("@"):
        alias = text.lower()
        if alias == "@reboot":
            raise _bad(expr, "@reboot is not supported: schedules need a time to fire at")
        if alias not in ALIASES:
            raise _bad(expr, f"unknown alias; known aliases: {', '.join(ALIASES)}")
        return ALIASES[alias]
    parts = text.split(" ")
    if len(parts) != 5:
        raise _bad(
            expr,
            f"it has {len(parts)} fields, cron needs exactly 5 ({_FORMAT}); "
            "seconds and year fields are not supported",
        )
    for spec, part in zip(_FIELDS, parts, strict=True):
        _check_field(expr, spec, part)
    try:
        CronSim(text, datetime(2000, 1, 1, tzinfo=UTC))
    except CronSimError as exc:  # e.g. "0 0 31 2 *": that day never comes
        raise _bad(
            expr, f"the day-of-month never occurs in the month(s) given, so it never fires ({exc})"
        ) from None
    return text


def _aware(name: str, dt: datetime) -> None:
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, got {dt!r}")


def _forward(expr: str, after: datetime, tz: tzinfo) -> Iterator[datetime]:
    """Fire times strictly after ``after``, increasing, as aware UTC datetimes.

    cronsim computes fixed-time jobs on naive wall time, which forgets the fold; after a
    start inside the repeated hour it can yield a time before the start. Such times (and
    repeats) are skipped, which is also what makes a fall-back job fire exactly once.
    """
    last = after
    it = CronSim(expr, after.astimezone(tz))
    while True:
        try:
            t = next(it).astimezone(UTC)
        except StopIteration:  # no fire within cronsim's 50-year horizon
            return
        if t > last:
            last = t
            yield t


def _backward(expr: str, until: datetime, tz: tzinfo) -> Iterator[datetime]:
    """Fire times at or before ``until``, decreasing, as aware UTC datetimes.

    Starts a margin past ``until``: walking back on naive wall time from inside the
    repeated hour would otherwise miss that day's first-pass fire.
    """
    last: datetime | None = None
    start = (until + _FOLD_MARGIN).astimezone(tz).replace(microsecond=0)
    it = CronSim(expr, start, reverse=True)
    while True:
        try:
            t = next(it).astimezone(UTC)
        except StopIteration:
            return
        if t <= until and (last is None or t < last):
            last = t
            yield t


def next_fire(expr: str, after: datetime, tz: tzinfo) -> datetime:
    """The first fire time strictly after ``after``, in UTC (DST rules in the module doc)."""
    _aware("after", after)
    for t in _forward(validate_cron(expr), after, tz):
        return t
    raise ValueError(f"cron expression {expr!r} does not fire after {after.isoformat()}")


def fires_between(
    expr: str, start: datetime, end: datetime, tz: tzinfo, limit: int = MAX_FIRES
) -> list[datetime]:
    """Fire times in ``(start, end]``, oldest first, in UTC: at most ``limit``, the earliest."""
    _aware("start", start)
    _aware("end", end)
    out: list[datetime] = []
    if end <= start or limit <= 0:
        return out
    for t in _forward(validate_cron(expr), start, tz):
        if t > end:
            break
        out.append(t)
        if len(out) >= limit:
            break
    return out


def missed_fires(
    expr: str, last_checked: datetime, now: datetime, tz: tzinfo, limit: int = MAX_FIRES
) -> list[datetime]:
    """Fire times in ``(last_checked, now]`` (the agent was down), oldest first, in UTC.

    Walks back from ``now``, so after a long outage it returns the most recent ``limit``
    fires (the ones that matter: the latest may still be run, see ``plan_misfires``)
    without iterating the whole outage.
    """
    _aware("last_checked", last_checked)
    _aware("now", now)
    out: list[datetime] = []
    if now <= last_checked or limit <= 0:
        return out
    for t in _backward(validate_cron(expr), now, tz):
        if t <= last_checked:
            break
        out.append(t)
        if len(out) >= limit:
            break
    out.reverse()
    return out


def _grace(grace_s: float) -> float:
    if not math.isfinite(grace_s) or grace_s < 0:
        raise ValueError(f"grace_s must be a finite number of seconds >= 0, got {grace_s!r}")
    return grace_s


def misfire_decision(
    scheduled_at: datetime, now: datetime, grace_s: float
) -> Literal["run", "missed"]:
    """``"run"`` if the fire is at most ``grace_s`` late, else ``"missed"``.

    A late start is still wanted shortly after a hiccup (a busy tick, a quick restart),
    but a start hours late (08:00 VM start run at 17:00) does more harm than skipping.
    A fire not yet due counts as on time; deciding when it is due is the caller's job.
    """
    _aware("scheduled_at", scheduled_at)
    _aware("now", now)
    late = (now - scheduled_at).total_seconds()
    return "run" if late <= _grace(grace_s) else "missed"


def plan_misfires(
    fires: Iterable[datetime], now: datetime, grace_s: float
) -> tuple[datetime | None, list[datetime]]:
    """Split the fires that came due while nobody looked into (one to run, the missed).

    Only the latest due fire may run, and only within grace: replaying every missed
    08:00 start after a week down would start a VM seven times. The rest are returned,
    oldest first, to be recorded as missed. Fires after ``now`` are not due and are left
    out of both. Results are in UTC.
    """
    _aware("now", now)
    grace = _grace(grace_s)
    due_set: set[datetime] = set()
    for f in fires:
        _aware("a fire time", f)
        if f <= now:
            # In UTC: across zones, == is False for a time in a repeated hour (PEP 495),
            # so the same instant given twice would not be merged otherwise.
            due_set.add(f.astimezone(UTC))
    due = sorted(due_set)
    if not due:
        return None, []
    latest = due[-1]
    if (now - latest).total_seconds() <= grace:
        return latest, due[:-1]
    return None, due


def stagger_offset(schedule_id: str, target_id: str, spread_s: float) -> float:
    """A delay in ``[0, spread_s)`` that is stable per (schedule, target).

    Spreads "start all VMs at 08:00" over a window so hosts do not spike, and keeps each
    VM's slot the same across agent restarts and machines: hence SHA-256 of the ids,
    not ``hash()``, which is salted per process.
    """
    if not math.isfinite(spread_s) or spread_s < 0:
        raise ValueError(f"spread_s must be a finite number of seconds >= 0, got {spread_s!r}")
    if spread_s == 0:
        return 0.0
    # Length prefix: ("a:b", "c") and ("a", "b:c") must not hash alike.
    key = f"{len(schedule_id)}:{schedule_id}:{target_id}".encode()
    u = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 11  # 53 bits
    offset = u / float(1 << 53) * spread_s
    return min(offset, math.nextafter(spread_s, 0.0))
