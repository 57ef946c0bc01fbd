"""Snapshot retention: which snapshots a policy like ``daily:7,weekly:4`` keeps.

The scripts stoker replaces treated ``daily:7,weekly:4`` as one time window where the
shortest rule won, so a week of hourly snapshots collapsed to seven days and the weekly
rule did nothing. Here every rule is a separate bucket rule with restic's ``forget
--keep-*`` semantics (also what Proxmox calls ``keep-*``):

* ``hourly:N`` / ``daily:N`` / ``weekly:N`` / ``monthly:N`` / ``yearly:N`` keep the newest
  snapshot of each of the N most recent periods that hold a snapshot. Periods are
  calendar periods in the time zone ``tz`` (weeks are ISO weeks, keyed by ISO year and
  week, so 2026-12-31 and 2027-01-01 can share a week). Each ``created`` is converted to
  ``tz`` first, so a 23- or 25-hour DST day is still one day. The hour that repeats when
  clocks go back counts as two hours (told apart by the UTC offset), because they are
  two real hours; restic, which keys on the wall clock, would merge them.
* ``last:N`` keeps the N newest snapshots.
* ``within:D`` keeps every snapshot newer than *newest snapshot - D*, as restic does:
  it is relative to the newest snapshot, not to "now", so a host whose snapshots stopped
  (broken schedule, agent down) never ages its last good snapshots out. ``D`` is a fixed
  length in stoker's one duration grammar (``domain.units.parse_duration``): ``s``, ``m``
  minutes, ``h`` hours, ``d`` days of 24 h, ``w`` weeks, largest first, like ``1d12h``.
  (restic reads ``m`` as months; stoker has no months or years in durations, to keep them
  exact.)

A snapshot kept by any rule stays; rules do not interact, so adding a rule can only keep
more. Protected snapshots are always kept (reason ``"protected"``). Like restic's
``--keep-tag``, protection itself consumes no rule slot; the snapshot still takes part in
the bucket rules like any other, so a protected snapshot that is the newest of its day is
also that day's ``daily`` pick (and consumes that slot), while an older protected snapshot
of the same day is kept only as protected. Unlike restic since 0.15, stoker does not also
keep the oldest snapshot when a rule has slots left over: that snapshot would be a second
pick from one period, which makes the "at most N per rule" promise false.

Pure: no I/O and no clock; the plan depends only on its arguments.
"""

from __future__ import annotations

import difflib
import re
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, tzinfo
from itertools import compress, filterfalse, repeat
from operator import attrgetter, sub
from typing import Literal, NamedTuple, Protocol, get_args

from stoker.domain import units

__all__ = [
    "BUCKET_KINDS",
    "PROTECTED_REASON",
    "RULE_KINDS",
    "KeptSnapshot",
    "RetentionPlan",
    "RetentionPolicy",
    "Rule",
    "RuleKind",
    "SnapshotLike",
    "format_duration",
    "parse_duration",
    "parse_policy",
    "plan",
]

RuleKind = Literal["last", "hourly", "daily", "weekly", "monthly", "yearly", "within"]
RULE_KINDS: tuple[str, ...] = get_args(RuleKind)
BUCKET_KINDS: tuple[str, ...] = RULE_KINDS[:-1]
PROTECTED_REASON = "protected"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_COUNT_RE = re.compile(r"\d{1,9}")


class SnapshotLike(Protocol):
    """What ``plan`` needs of a snapshot; the store's records satisfy it structurally.

    Read-only properties, so frozen dataclasses and NamedTuples also match under a type
    checker (a plain ``id: str`` member would demand a settable attribute).
    """

    @property
    def id(self) -> str: ...

    @property
    def created(self) -> datetime:  # timezone-aware
        ...

    @property
    def protected(self) -> bool: ...


def parse_duration(text: str) -> timedelta:
    """A retention window or snapshot interval, in stoker's one duration grammar
    (:func:`stoker.domain.units.parse_duration`: ``30m``, ``12h``, ``7d``, ``1w2d12h30m``).

    Raises ``ValueError`` saying what to write instead, because this text comes from
    operators.
    """
    seconds = units.parse_duration(text)
    if seconds <= 0:
        raise ValueError(f"duration {text!r} must be longer than zero")
    if seconds != int(seconds):
        raise ValueError(f"duration {text!r} must be a whole number of seconds")
    return timedelta(seconds=int(seconds))


def format_duration(d: timedelta) -> str:
    """Canonical text of a duration (largest units first, e.g. ``1w2d12h``)."""
    seconds, rest = divmod(d, timedelta(seconds=1))
    if rest or seconds <= 0:
        raise ValueError(f"duration {d} must be a positive whole number of seconds")
    return units.format_duration(seconds)


@dataclass(frozen=True)
class Rule:
    """One rule of a policy: a bucket rule with ``count``, or ``within`` with ``duration``."""

    kind: RuleKind
    count: int | None = None
    duration: timedelta | None = None

    def __post_init__(self) -> None:
        if self.kind not in RULE_KINDS:
            raise ValueError(f"unknown rule {self.kind!r}; known rules: {', '.join(RULE_KINDS)}")
        if self.kind == "within":
            if self.duration is None or self.count is not None:
                raise ValueError("a 'within' rule takes a duration and no count")
            format_duration(self.duration)  # validates: positive, whole seconds
        else:
            if self.duration is not None:
                raise ValueError(f"a {self.kind!r} rule takes a count, not a duration")
            if not isinstance(self.count, int) or isinstance(self.count, bool) or self.count < 1:
                raise ValueError(f"{self.kind}:N needs N to be a positive integer")

    def __str__(self) -> str:
        if self.kind == "within":
            assert self.duration is not None
            return f"within:{format_duration(self.duration)}"
        return f"{self.kind}:{self.count}"


@dataclass(frozen=True)
class RetentionPolicy:
    """A validated set of rules, held in canonical order so equal policies compare equal."""

    rules: tuple[Rule, ...]

    def __post_init__(self) -> None:
        if not self.rules:
            raise ValueError("empty retention policy; give at least one rule such as 'daily:7'")
        kinds = [r.kind for r in self.rules]
        for k in kinds:
            if kinds.count(k) > 1:
                raise ValueError(f"rule {k!r} given twice; give each rule at most once")
        ordered = tuple(sorted(self.rules, key=lambda r: RULE_KINDS.index(r.kind)))
        object.__setattr__(self, "rules", ordered)

    def __str__(self) -> str:
        return ",".join(str(r) for r in self.rules)


def parse_policy(text: str) -> RetentionPolicy:
    """Parse ``daily:7,weekly:4``-style text; errors say exactly which part to fix."""
    if not text or not text.strip():
        raise ValueError(
            "empty retention policy; give at least one rule such as 'daily:7' "
            "(rules: " + ", ".join(f"{k}:N" for k in BUCKET_KINDS) + ", within:DURATION)"
        )
    rules: list[Rule] = []
    seen: set[str] = set()
    for index, raw in enumerate(text.split(","), start=1):
        item = raw.strip()
        if not item:
            raise ValueError(f"empty rule at position {index} in {text!r} (stray comma?)")
        name, colon, value = item.partition(":")
        kind = name.strip().lower()
        value = value.strip()
        if kind not in RULE_KINDS:
            close = difflib.get_close_matches(kind, RULE_KINDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"unknown rule {name.strip()!r}{hint}; known rules: {', '.join(RULE_KINDS)}"
            )
        if kind in seen:
            raise ValueError(f"rule {kind!r} given twice in {text!r}; give each rule once")
        seen.add(kind)
        if kind == "within":
            if not colon or not value:
                raise ValueError("rule 'within' needs a duration: write e.g. 'within:7d'")
            rules.append(Rule("within", duration=parse_duration(value)))
            continue
        example = f"'{kind}:7'"
        if not colon or not value:
            raise ValueError(f"rule {kind!r} needs a count: write e.g. {example}")
        if not _COUNT_RE.fullmatch(value) or int(value) < 1:
            raise ValueError(
                f"in {item!r}, N must be a positive integer (1, 2, ...), got {value!r}; "
                f"write e.g. {example}"
            )
        rules.append(Rule(kind, count=int(value)))  # type: ignore[arg-type]
    return RetentionPolicy(tuple(rules))


class KeptSnapshot(NamedTuple):
    """A snapshot the plan keeps, with every rule that wanted it (for ``--explain`` output).

    A NamedTuple rather than a frozen dataclass: plans can keep 100,000 of these and a
    frozen dataclass costs several times more to construct.
    """

    id: str
    created: datetime
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class RetentionPlan:
    """The outcome of ``plan``: both lists oldest first, together exactly the input."""

    keep: tuple[KeptSnapshot, ...] = field(default_factory=tuple)
    remove: tuple[str, ...] = field(default_factory=tuple)


# Per bucket kind: the period key of a local time, the label of the period, and the
# instant (as a timedelta since the epoch) at which the period began.
def _hour_key(t: datetime) -> Hashable:
    # utcoffset tells apart the two wall-clock hours that share a number on fall-back.
    return (t.year, t.month, t.day, t.hour, t.utcoffset())


def _hour_label(t: datetime) -> str:
    # Keep t's own offset: t.replace(minute=0) could land outside a repeated half hour.
    s = t.isoformat(timespec="minutes")  # YYYY-MM-DDTHH:MM+HH:MM
    return f"hourly {s[:14]}00{s[16:]}"


def _hour_start(t: datetime, tz: tzinfo) -> timedelta:
    # In t's own offset. Wrong only if the offset changed within the hour (Lord Howe's
    # half-hour DST); the caller's check of the jump catches that.
    return (t - _EPOCH) - timedelta(minutes=t.minute, seconds=t.second, microseconds=t.microsecond)


def _day_key(t: datetime) -> Hashable:
    return t.toordinal()


def _day_label(t: datetime) -> str:
    return f"daily {t.date().isoformat()}"


def _local_midnight(d: date, tz: tzinfo) -> timedelta:
    # fold=0: an ambiguous midnight means its first occurrence, a skipped one the instant
    # of the jump (PEP 495), so the result is never earlier than the day's real start.
    return datetime(d.year, d.month, d.day, tzinfo=tz) - _EPOCH


def _day_start(t: datetime, tz: tzinfo) -> timedelta:
    return _local_midnight(t.date(), tz)


def _week_key(t: datetime) -> Hashable:
    iso = t.isocalendar()
    return (iso.year, iso.week)


def _week_label(t: datetime) -> str:
    iso = t.isocalendar()
    return f"weekly {iso.year}-W{iso.week:02d}"


def _week_start(t: datetime, tz: tzinfo) -> timedelta:
    return _local_midnight(t.date() - timedelta(days=t.weekday()), tz)


def _month_key(t: datetime) -> Hashable:
    return (t.year, t.month)


def _month_label(t: datetime) -> str:
    return f"monthly {t.year}-{t.month:02d}"


def _month_start(t: datetime, tz: tzinfo) -> timedelta:
    return _local_midnight(date(t.year, t.month, 1), tz)


def _year_key(t: datetime) -> Hashable:
    return t.year


def _year_label(t: datetime) -> str:
    return f"yearly {t.year}"


def _year_start(t: datetime, tz: tzinfo) -> timedelta:
    return _local_midnight(date(t.year, 1, 1), tz)


_Period = tuple[
    Callable[[datetime], Hashable],
    Callable[[datetime], str],
    Callable[[datetime, tzinfo], timedelta],
]
_PERIODS: dict[str, _Period] = {
    "hourly": (_hour_key, _hour_label, _hour_start),
    "daily": (_day_key, _day_label, _day_start),
    "weekly": (_week_key, _week_label, _week_start),
    "monthly": (_month_key, _month_label, _month_start),
    "yearly": (_year_key, _year_label, _year_start),
}


def plan(
    snapshots: Iterable[SnapshotLike], policy: RetentionPolicy | str, tz: tzinfo
) -> RetentionPlan:
    """Decide which snapshots ``policy`` keeps and which it removes (see the module doc).

    Sorts once, newest first (equal times are ordered by id, so the plan does not depend
    on the input order); then each rule walks that order only as far as it needs, one
    period at a time (see the bucket loop). Attributes are read column-wise and sorted
    as ``timedelta`` keys because comparing aware datetimes calls ``utcoffset`` on every
    comparison. Raises ``ValueError`` for naive ``created`` times or repeated ids, which
    would make the plan ambiguous.
    """
    pol = parse_policy(policy) if isinstance(policy, str) else policy
    recs = list(snapshots)
    n = len(recs)
    if n == 0:
        return RetentionPlan()
    created: list[datetime] = list(map(attrgetter("created"), recs))
    ids: list[str] = list(map(attrgetter("id"), recs))
    try:
        # Subtracting an aware epoch rejects naive times for free and gives exact keys.
        keys: list[timedelta] = list(map(sub, created, repeat(_EPOCH)))
    except TypeError:
        bad = next(r.id for r in recs if r.created.tzinfo is None)
        raise ValueError(f"snapshot {bad!r} has a naive created time; it must be aware") from None
    if len(set(ids)) != n:
        seen: set[str] = set()
        for sid in ids:
            if sid in seen:
                raise ValueError(f"snapshot id {sid!r} appears more than once")
            seen.add(sid)
    if len(set(keys)) == n:
        order = sorted(range(n), key=keys.__getitem__, reverse=True)
    else:  # equal times: break ties by id so the plan is the same for any input order
        order = sorted(range(n), key=lambda j: (keys[j], ids[j]), reverse=True)

    # Reasons by input index; an index that is not here gets removed.
    reasons: dict[int, list[str]] = {
        j: [PROTECTED_REASON] for j in compress(range(n), map(attrgetter("protected"), recs))
    }

    def mark(j: int, why: str) -> None:
        r = reasons.get(j)
        if r is None:
            reasons[j] = [why]
        else:
            r.append(why)

    asc = list(map(keys.__getitem__, reversed(order)))  # oldest first, for bisect

    for rule in pol.rules:
        if rule.kind == "within":
            assert rule.duration is not None
            # Keep times > newest - duration: all but the oldest bisect_right(...) ones.
            upto = n - bisect_right(asc, asc[-1] - rule.duration)
            why = f"within {format_duration(rule.duration)}"
            for j in order[:upto]:
                mark(j, why)
        elif rule.kind == "last":
            assert rule.count is not None
            for rank, j in enumerate(order[: rule.count], start=1):
                mark(j, f"last {rank}")
        else:
            assert rule.count is not None
            key_of, label_of, start_of = _PERIODS[rule.kind]
            # Walk period by period: take the newest snapshot, then bisect past the rest
            # of its period, so a rule costs O(N log n), not a time-zone conversion per
            # snapshot. The jump is checked against the oldest snapshot it skips and
            # falls back to one step if that is in another period (an offset change
            # inside an hour, as on Lord Howe Island). Picked periods are a set, not
            # "changed since the previous one", in case a local period recurs.
            picked: set[Hashable] = set()
            p = 0
            while p < n:
                t = created[order[p]].astimezone(tz)
                k = key_of(t)
                if k not in picked:
                    picked.add(k)
                    mark(order[p], label_of(t))
                    if len(picked) == rule.count:
                        break
                q = n - bisect_left(asc, start_of(t, tz))  # first position older than the start
                if q > p + 1 and key_of(created[order[q - 1]].astimezone(tz)) != k:
                    q = p + 1
                p = max(q, p + 1)

    oldest_first = order[::-1]
    keep = tuple(
        KeptSnapshot(ids[j], created[j], tuple(reasons[j]))
        for j in filter(reasons.__contains__, oldest_first)
    )
    remove = tuple(map(ids.__getitem__, filterfalse(reasons.__contains__, oldest_first)))
    return RetentionPlan(keep, remove)
