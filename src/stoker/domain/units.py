"""Unit conversions: durations, sizes, CPU caps, VMM memory limits and rate-limit buckets.

Every number that crosses into a cgroup file, a Firecracker body or a tc qdisc goes through
here, so the arithmetic the originals got wrong (a bucket ten times too small, a CPU "quota"
that was a weight, a memory limit that killed the VMM) is written and tested once.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4

# --------------------------------------------------------------------------- durations

_DURATION_UNITS: dict[str, float] = {
    "w": 7 * 86_400.0,
    "d": 86_400.0,
    "h": 3_600.0,
    "m": 60.0,
    "s": 1.0,
    "ms": 0.001,
}
_UNIT_ORDER = ["w", "d", "h", "m", "s", "ms"]
_DURATION_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]+)")
_PLAIN_NUMBER = re.compile(r"\d+(?:\.\d+)?")
#: the longest duration anything in stoker takes (a century): bigger ones are typos, and
#: would overflow dates computed from them
MAX_DURATION_S = 100 * 365 * 86_400.0


def parse_duration(text: str) -> float:
    """Parse "90s", "1h30m", "2d" or a bare number of seconds into seconds.

    The one duration grammar of stoker (config, API queries, retention windows, snapshot
    intervals): a number and a unit, units w, d, h, m, s and ms, largest first, each at most
    once, so "1m1h" is an error rather than a silent sum; a typo in a retention window should
    not pass as a valid one. At most a century.
    """
    s = text.strip()
    if not s:
        raise ValueError("empty duration: expected something like '30s', '5m' or '1h30m'")
    if _PLAIN_NUMBER.fullmatch(s):
        return _bounded(text, float(s))
    total = 0.0
    pos = 0
    last_rank = -1
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if m is None:
            raise ValueError(
                f"bad duration {text!r} at {s[pos:]!r}: expected a number followed by one of "
                "w, d, h, m, s, ms (for example '1h30m')"
            )
        unit = m.group(2)
        if unit not in _DURATION_UNITS:
            hint = (
                " (months and years are not supported: use d or w)"
                if unit.lower() in {"y", "mo", "mon", "month", "months", "year", "years"}
                or unit == "M"
                else ""
            )
            raise ValueError(
                f"bad duration {text!r}: unknown unit {unit!r}{hint}; "
                "use one of w, d, h, m, s, ms (for example '1h30m')"
            )
        rank = _UNIT_ORDER.index(unit)
        if rank == last_rank:
            raise ValueError(f"bad duration {text!r}: unit {unit!r} given twice")
        if rank < last_rank:
            raise ValueError(
                f"bad duration {text!r}: units must go from largest to smallest, "
                f"each at most once (w d h m s ms)"
            )
        last_rank = rank
        total += float(m.group(1)) * _DURATION_UNITS[unit]
        pos = m.end()
    return _bounded(text, total)


def _bounded(text: str, seconds: float) -> float:
    if not seconds <= MAX_DURATION_S:  # also catches inf, from a number too big for a float
        shown = text.strip() if len(text.strip()) <= 40 else text.strip()[:37] + "..."
        raise ValueError(f"duration {shown!r} is longer than a century (36500d)")
    return seconds


def format_duration(seconds: float) -> str:
    """Render seconds the way parse_duration reads them: "1h30m", "45s", "250ms".

    Below a minute fractions are kept (to the millisecond) because boot and probe times live
    there; from a minute up, whole seconds are enough for a human.
    """
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"cannot format a non-finite duration: {seconds}")
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds < 1:
        ms = round(seconds * 1000)
        return f"{ms}ms" if ms < 1000 else "1s"
    if seconds < 60:
        text = f"{seconds:.3f}".rstrip("0").rstrip(".")
        return f"{text}s" if text != "60" else "1m"
    rest = round(seconds)
    parts = []
    for unit in ("w", "d", "h", "m", "s"):
        size = int(_DURATION_UNITS[unit])
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


# --------------------------------------------------------------------------- sizes

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([KMGT])(?:i?B)?|B)?", re.IGNORECASE)
_SIZE_POWERS = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB}


def parse_size(value: str | int) -> int:
    """Parse "512M", "4G", "1.5GiB", "65536" or an int into bytes.

    All suffixes are powers of 1024 (K, M, G, T, with or without "iB"/"B", any case), as
    QEMU's -m and most VM tools read them; a guest's "4G" must mean 4 GiB, not 4e9 bytes.
    """
    if isinstance(value, bool):
        raise ValueError("a size must be a number of bytes or a string like '512M'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative: {value}")
        return value
    m = _SIZE.fullmatch(value.strip())
    if m is None:
        raise ValueError(
            f"bad size {value!r}: expected bytes or a number with K, M, G or T "
            "(powers of 1024), for example '512M' or '4GiB'"
        )
    number = Fraction(m.group(1)) * _SIZE_POWERS[(m.group(2) or "").upper()]
    if number.denominator != 1:
        raise ValueError(f"bad size {value!r}: it is not a whole number of bytes")
    return int(number)


def mib_to_bytes(mib: int) -> int:
    return mib * MiB


def gib_to_bytes(gib: int) -> int:
    return gib * GiB


def bytes_to_mib(n: int) -> float:
    return n / MiB


def bytes_to_gib(n: int) -> float:
    return n / GiB


def format_size(n: int) -> str:
    """Human size in binary units ("512 MiB", "1.5 GiB") for messages and the CLI."""
    for unit, size in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            text = f"{n / size:.1f}".removesuffix(".0")
            return f"{text} {unit}"
    return f"{n} B"


# --------------------------------------------------------------------------- CPU

#: The kernel accepts CFS periods from 1 ms to 1 s and quotas of at least 1 ms.
CFS_PERIOD_MIN_US = 1_000
CFS_PERIOD_MAX_US = 1_000_000
CFS_QUOTA_MIN_US = 1_000


def cpu_percent_to_cfs(percent: int, period_us: int = 100_000) -> tuple[int, int]:
    """A hard CPU cap as (quota_us, period_us): one core is 100%, so 200% is two cores.

    This is a cap (CFS bandwidth), not cpu.shares/cpu.weight, which is only a relative
    weight under contention and never limits an idle host; the originals confused the two.
    """
    if percent <= 0:
        raise ValueError(f"CPU cap must be a positive percentage (100 = one core), got {percent}")
    if not CFS_PERIOD_MIN_US <= period_us <= CFS_PERIOD_MAX_US:
        raise ValueError(
            f"CFS period must be between {CFS_PERIOD_MIN_US} and {CFS_PERIOD_MAX_US} us, "
            f"got {period_us}"
        )
    quota = percent * period_us // 100
    if quota < CFS_QUOTA_MIN_US:
        raise ValueError(
            f"CPU cap {percent}% of a {period_us} us period is a {quota} us quota; "
            f"the kernel needs at least {CFS_QUOTA_MIN_US} us"
        )
    return quota, period_us


def cgroup_v2_cpu_max(percent: int, period_us: int = 100_000) -> str:
    """The line to write to cgroup v2 cpu.max: "QUOTA PERIOD" (200% -> "200000 100000")."""
    quota, period = cpu_percent_to_cfs(percent, period_us)
    return f"{quota} {period}"


# --------------------------------------------------------------------------- memory

#: Measured: a 128 MiB guest under QEMU 7.2 microvm/TCG has about 220 MiB RSS, so the VMM
#: itself needs about 92 MiB. 160 MiB leaves ~70 MiB of margin for what grows after boot
#: (the TCG translation cache, virtio queues, block and network buffers, a QMP migration).
DEFAULT_QEMU_OVERHEAD_BYTES = 160 * MiB


def vmm_memory_limit_bytes(
    guest_mib: int, overhead_bytes: int = DEFAULT_QEMU_OVERHEAD_BYTES
) -> int:
    """The cgroup memory limit for a VMM process: guest RAM plus the VMM's own overhead.

    The cgroup charges the whole VMM process: guest RAM it has touched plus its own code,
    heap, device emulation and I/O buffers. A limit equal to guest RAM is therefore reached
    as soon as the guest uses its memory, and the OOM killer takes the VMM, i.e. the VM.
    """
    if guest_mib <= 0:
        raise ValueError(f"guest memory must be positive, got {guest_mib} MiB")
    if overhead_bytes < 0:
        raise ValueError(f"VMM overhead must not be negative, got {overhead_bytes}")
    return guest_mib * MiB + overhead_bytes


# --------------------------------------------------------------------------- Firecracker

#: One full network frame. A bucket smaller than this cannot hold a single large frame:
#: Firecracker then logs an over-consumption error on every such frame.
MIN_NET_BUCKET_BYTES = 65_562
BYTES_PER_MBIT = 125_000  # 1 Mbps = 1e6 bits/s = 125,000 bytes/s


@dataclass(frozen=True)
class TokenBucket:
    """A Firecracker TokenBucket: `size` tokens refilled every `refill_time` ms.

    The rate is size / refill_time, so size alone is meaningless without its refill time.
    """

    size: int
    refill_time: int
    one_time_burst: int = 0

    def __post_init__(self) -> None:
        if self.size < 0 or self.refill_time < 0 or self.one_time_burst < 0:
            raise ValueError("token bucket size, refill_time and one_time_burst must be >= 0")

    @property
    def rate_per_s(self) -> float:
        """Tokens per second this bucket lets through once its bursts are spent."""
        return self.size * 1000 / self.refill_time if self.refill_time else 0.0

    def to_api(self) -> dict[str, int]:
        """The body Firecracker's API expects (one_time_burst only when set)."""
        body = {"size": self.size, "refill_time": self.refill_time}
        if self.one_time_burst:
            body["one_time_burst"] = self.one_time_burst
        return body


def _bucket(rate_per_s: float, refill_ms: int, min_size: int, one_time_burst: int) -> TokenBucket:
    """A bucket for `rate_per_s` whose size is at least `min_size`.

    When the size for `refill_ms` would be below the minimum, the refill time is lengthened
    instead of only raising the size: a larger size with the same refill time would raise
    the rate (1 Mbps at 100 ms with size 65,562 is 5.2 Mbps), and the rate is what was asked.
    """
    if not math.isfinite(rate_per_s) or rate_per_s <= 0:
        raise ValueError(f"rate must be a positive number, got {rate_per_s}")
    if refill_ms <= 0:
        raise ValueError(f"refill time must be a positive number of ms, got {refill_ms}")
    size = round(rate_per_s * refill_ms / 1000)
    if size < min_size:
        refill_ms = math.ceil(min_size * 1000 / rate_per_s)
        size = max(min_size, round(rate_per_s * refill_ms / 1000))
    return TokenBucket(size=size, refill_time=refill_ms, one_time_burst=one_time_burst)


def mbps_to_bucket(mbps: float, refill_ms: int = 100, one_time_burst: int = 0) -> TokenBucket:
    """Network bandwidth: size = mbps * 125,000 * refill_ms / 1000 bytes, at least one frame.

    100 Mbps at 100 ms is 1,250,000 bytes. Below one frame (under ~5.25 Mbps at 100 ms) the
    refill time grows so the bucket holds a frame and the rate stays as asked.
    """
    return _bucket(mbps * BYTES_PER_MBIT, refill_ms, MIN_NET_BUCKET_BYTES, one_time_burst)


def pps_to_bucket(pps: int, refill_ms: int = 1000, one_time_burst: int = 0) -> TokenBucket:
    """Packets per second: size = pps * refill_ms / 1000 operations, at least one."""
    return _bucket(pps, refill_ms, 1, one_time_burst)


def iops_to_bucket(iops: int, refill_ms: int = 1000, one_time_burst: int = 0) -> TokenBucket:
    """Disk operations per second, same arithmetic as packets."""
    return _bucket(iops, refill_ms, 1, one_time_burst)


def bytes_per_s_to_bucket(
    bytes_per_s: int, refill_ms: int = 100, one_time_burst: int = 0, min_size: int = 1
) -> TokenBucket:
    """Disk bandwidth in bytes/s: size = bytes_per_s * refill_ms / 1000 bytes."""
    return _bucket(bytes_per_s, refill_ms, min_size, one_time_burst)


def _limiter(bandwidth: TokenBucket | None, ops: TokenBucket | None) -> dict[str, Any] | None:
    body: dict[str, Any] = {}
    if bandwidth is not None:
        body["bandwidth"] = bandwidth.to_api()
    if ops is not None:
        body["ops"] = ops.to_api()
    return body or None


def rate_limiter(mbps: float | None, pps: int | None) -> dict[str, Any] | None:
    """A Firecracker RateLimiter body for a network interface; None when nothing is limited."""
    return _limiter(
        mbps_to_bucket(mbps) if mbps is not None else None,
        pps_to_bucket(pps) if pps is not None else None,
    )


def disk_rate_limiter(bytes_per_s: int | None, iops: int | None) -> dict[str, Any] | None:
    """A Firecracker RateLimiter body for a drive; None when nothing is limited."""
    return _limiter(
        bytes_per_s_to_bucket(bytes_per_s) if bytes_per_s is not None else None,
        iops_to_bucket(iops) if iops is not None else None,
    )


# --------------------------------------------------------------------------- tc

#: An Ethernet frame at the default MTU: 1500 bytes of payload plus a 14-byte header.
ETH_FRAME_BYTES = 1514


def mbps_to_bytes_per_s(mbps: float) -> int:
    """tc (pyroute2) takes integer bytes/s: 1 Mbps = 125,000 bytes/s."""
    if not math.isfinite(mbps) or mbps <= 0:
        raise ValueError(f"bandwidth must be a positive number of Mbps, got {mbps}")
    return round(mbps * BYTES_PER_MBIT)


def tbf_burst_bytes(
    rate_bytes_per_s: int, hz: int = 250, frame_bytes: int = ETH_FRAME_BYTES
) -> int:
    """A tbf burst that can reach the configured rate.

    The bucket must hold at least one timer tick's worth of bytes (rate / HZ), or the qdisc
    cannot send at the full rate, and at least one whole frame, or frames larger than the
    bucket are never sent.
    """
    if rate_bytes_per_s <= 0:
        raise ValueError(f"rate must be positive, got {rate_bytes_per_s} bytes/s")
    if hz <= 0:
        raise ValueError(f"HZ must be positive, got {hz}")
    return max(math.ceil(rate_bytes_per_s / hz), frame_bytes)
