"""Argument validation for tc limits and TAP names (no kernel needed)."""

from __future__ import annotations

import pytest

from stoker.host import netlimits, tap


@pytest.mark.parametrize(
    ("rate", "burst", "error"),
    [
        ("10mbit", 16_000, TypeError),  # strings are refused: suffixes are case-sensitive
        (1.5e6, 16_000, TypeError),
        (True, 16_000, TypeError),
        (0, 16_000, ValueError),
        (-1, 16_000, ValueError),
        (2**32, 16_000, ValueError),
        (1_250_000, 100, ValueError),  # smaller than a frame
        (1_250_000, "16k", TypeError),
    ],
)
def test_rate_validation(rate: object, burst: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        netlimits.apply_egress_limit("tap0", rate, burst)  # type: ignore[arg-type]
    with pytest.raises(error):
        netlimits.apply_ingress_limit("tap0", rate, burst)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["", "a" * 16, "tap/0", "tap 0", "tap:0", "-tap", "tap\n"])
def test_bad_ifnames(name: str) -> None:
    with pytest.raises(ValueError):
        tap.validate_ifname(name)


def test_ifb_name_fits_and_is_stable() -> None:
    assert len(netlimits.ifb_name("tap-very-long1")) <= 15
    assert netlimits.ifb_name("tap0") == netlimits.ifb_name("tap0")
    assert netlimits.ifb_name("tap0") != netlimits.ifb_name("tap1")


def test_packet_rate_validation_and_refusal() -> None:
    with pytest.raises(ValueError):
        netlimits.apply_packet_rate_limit("tap0", 0)
    with pytest.raises(netlimits.PacketRateUnsupported, match="ops"):
        netlimits.apply_packet_rate_limit("tap0", 1000)


def test_kernel_tc_support_keys() -> None:
    support = netlimits.kernel_tc_support()
    assert {"tbf", "police", "ifb", "u32", "mirred"} <= support.keys()
