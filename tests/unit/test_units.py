"""Unit conversions, with every bucket worked out by hand."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stoker.domain.units import (
    DEFAULT_QEMU_OVERHEAD_BYTES,
    MIN_NET_BUCKET_BYTES,
    GiB,
    MiB,
    TokenBucket,
    bytes_per_s_to_bucket,
    cgroup_v2_cpu_max,
    cpu_percent_to_cfs,
    disk_rate_limiter,
    format_duration,
    format_size,
    iops_to_bucket,
    mbps_to_bucket,
    mbps_to_bytes_per_s,
    parse_duration,
    parse_size,
    pps_to_bucket,
    rate_limiter,
    tbf_burst_bytes,
    vmm_memory_limit_bytes,
)

# ------------------------------------------------------------------ durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1h", 3600.0),
        ("90s", 90.0),
        ("1h30m", 5400.0),
        ("1h 30m", 5400.0),
        ("2d", 172_800.0),
        ("1w", 604_800.0),
        ("1w2d3h4m5s", 604_800 + 2 * 86_400 + 3 * 3600 + 4 * 60 + 5.0),
        ("250ms", 0.25),
        ("1.5h", 5400.0),
        ("30", 30.0),
        (" 5m ", 300.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty"),
        ("1x", "w, d, h, m, s, ms"),
        ("h", "w, d, h, m, s, ms"),
        ("-5m", "w, d, h, m, s, ms"),
        ("1m1h", "largest to smallest"),
        ("1h1h", "given twice"),
        ("12h1d", "largest to smallest"),
        ("5y", "months and years are not supported"),
        ("99999999999999999999999d", "longer than a century"),
        ("9" * 400, "longer than a century"),
        ("1H", "w, d, h, m, s, ms"),
    ],
)
def test_parse_duration_rejects_with_a_clear_message(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0ms"),
        (0.25, "250ms"),
        (1.5, "1.5s"),
        (45, "45s"),
        (5400, "1h30m"),
        (90_000, "1d1h"),
        (8 * 86_400, "1w1d"),
        (-60, "-1m"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.integers(1, 10 * 365 * 86_400))
def test_duration_round_trip(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


# ------------------------------------------------------------------ sizes


@pytest.mark.parametrize(
    ("text", "n"),
    [
        ("512M", 512 * MiB),
        ("4G", 4 * GiB),
        ("4GiB", 4 * GiB),
        ("4gb", 4 * GiB),
        ("1.5G", 3 * GiB // 2),
        ("65536", 65536),
        ("100B", 100),
        ("1K", 1024),
        (7, 7),
    ],
)
def test_parse_size(text: str | int, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("bad", ["", "M", "12X", "-1M", "0.3K", "1.5"])
def test_parse_size_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


def test_format_size() -> None:
    assert format_size(512 * MiB) == "512 MiB"
    assert format_size(3 * GiB // 2) == "1.5 GiB"
    assert format_size(10) == "10 B"


# ------------------------------------------------------------------ CPU and memory


def test_cpu_caps() -> None:
    assert cpu_percent_to_cfs(200) == (200_000, 100_000)
    assert cpu_percent_to_cfs(100) == (100_000, 100_000)
    assert cpu_percent_to_cfs(50) == (50_000, 100_000)
    assert cpu_percent_to_cfs(150, period_us=10_000) == (15_000, 10_000)
    assert cgroup_v2_cpu_max(200) == "200000 100000"


@pytest.mark.parametrize("percent", [0, -100])
def test_cpu_cap_must_be_positive(percent: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        cpu_percent_to_cfs(percent)


def test_cpu_cap_respects_kernel_minimum() -> None:
    with pytest.raises(ValueError, match="at least 1000"):
        cpu_percent_to_cfs(5, period_us=10_000)


def test_vmm_memory_limit_is_above_guest_ram() -> None:
    limit = vmm_memory_limit_bytes(128)
    assert limit == 128 * MiB + DEFAULT_QEMU_OVERHEAD_BYTES
    # Measured RSS of a 128 MiB guest under QEMU is about 220 MiB: the default must cover it.
    assert limit > 220 * MiB
    assert vmm_memory_limit_bytes(128, overhead_bytes=0) == 128 * MiB
    with pytest.raises(ValueError):
        vmm_memory_limit_bytes(0)


# ------------------------------------------------------------------ Firecracker buckets


def test_network_buckets_by_hand() -> None:
    assert mbps_to_bucket(100) == TokenBucket(size=1_250_000, refill_time=100)
    assert mbps_to_bucket(1000, refill_ms=1000) == TokenBucket(125_000_000, 1000)
    assert mbps_to_bucket(10, refill_ms=100) == TokenBucket(125_000, 100)


def test_small_rates_keep_one_frame_and_the_rate() -> None:
    # 1 Mbps at 100 ms would be 12,500 bytes, less than one 65,562-byte frame. Raising only
    # the size would allow 655,620 bytes/s (5.2 Mbps); the refill time grows instead.
    bucket = mbps_to_bucket(1)
    assert bucket == TokenBucket(size=65_625, refill_time=525)
    assert bucket.size >= MIN_NET_BUCKET_BYTES
    assert bucket.rate_per_s == pytest.approx(125_000)


@given(st.floats(0.01, 100_000), st.sampled_from([10, 100, 1000]))
def test_network_bucket_rate_is_what_was_asked(mbps: float, refill_ms: int) -> None:
    bucket = mbps_to_bucket(mbps, refill_ms)
    assert bucket.size >= MIN_NET_BUCKET_BYTES
    assert bucket.rate_per_s == pytest.approx(mbps * 125_000, rel=1e-3)


def test_ops_buckets_by_hand() -> None:
    assert pps_to_bucket(10_000) == TokenBucket(10_000, 1000)
    assert pps_to_bucket(10_000, refill_ms=100) == TokenBucket(1_000, 100)
    assert pps_to_bucket(1, refill_ms=100) == TokenBucket(1, 1000)
    assert iops_to_bucket(500) == TokenBucket(500, 1000)
    assert bytes_per_s_to_bucket(50 * MiB) == TokenBucket(5_242_880, 100)


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf")])
def test_bucket_rejects_non_positive_rates(bad: float) -> None:
    with pytest.raises(ValueError):
        mbps_to_bucket(bad)


def test_to_api_matches_firecracker_token_bucket() -> None:
    assert TokenBucket(1000, 100).to_api() == {"size": 1000, "refill_time": 100}
    assert TokenBucket(1000, 100, one_time_burst=5000).to_api() == {
        "size": 1000,
        "refill_time": 100,
        "one_time_burst": 5000,
    }


def test_rate_limiter_bodies() -> None:
    assert rate_limiter(None, None) is None
    assert rate_limiter(100, 10_000) == {
        "bandwidth": {"size": 1_250_000, "refill_time": 100},
        "ops": {"size": 10_000, "refill_time": 1000},
    }
    assert rate_limiter(100, None) == {"bandwidth": {"size": 1_250_000, "refill_time": 100}}
    assert rate_limiter(None, 5) == {"ops": {"size": 5, "refill_time": 1000}}
    assert disk_rate_limiter(None, 1000) == {"ops": {"size": 1000, "refill_time": 1000}}
    assert disk_rate_limiter(None, None) is None


# ------------------------------------------------------------------ tc


def test_tc_rates() -> None:
    assert mbps_to_bytes_per_s(1) == 125_000
    assert mbps_to_bytes_per_s(100) == 12_500_000
    # 100 Mbps at HZ 250: 50,000 bytes per tick.
    assert tbf_burst_bytes(12_500_000) == 50_000
    # 1 Mbps: 500 bytes per tick is less than a frame, so one frame.
    assert tbf_burst_bytes(125_000) == 1514
    with pytest.raises(ValueError):
        tbf_burst_bytes(0)
