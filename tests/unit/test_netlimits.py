"""Argument validation for tc limits and TAP names (no kernel needed)."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

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
    # Stable across agent versions too: clear_limits finds an ifb an older agent made by name.
    # "ifb" + the first 12 hex digits of sha1(ifname) (`printf tap0 | sha1sum`: 44da6a09182f...)
    assert netlimits.ifb_name("tap0") == "ifb44da6a09182f"
    assert netlimits.ifb_name("tap-very-long1") == "ifbc293ff1a1d06"


def test_packet_rate_validation_and_refusal() -> None:
    with pytest.raises(ValueError):
        netlimits.apply_packet_rate_limit("tap0", 0)
    with pytest.raises(netlimits.PacketRateUnsupported, match="ops"):
        netlimits.apply_packet_rate_limit("tap0", 1000)


#: A kernel config as /proc/config.gz holds it, with the traps a parser can fall into.
KERNEL_CONFIG = """\
CONFIG_NET_SCH_TBF=y
CONFIG_NET_SCH_HTB=m
# CONFIG_NET_SCH_FQ is not set
CONFIG_NET_SCH_FQ_CODEL=y
CONFIG_NET_SCH_INGRESS=m
CONFIG_NET_CLS_U32_MARK=y
CONFIG_NET_ACT_MIRRED=m
# CONFIG_NET_ACT_POLICE is not set
CONFIG_NET_ACT_POLICE_EXTRA=y
"""


@pytest.fixture
def proc_config_gz(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Where kernel_tc_support reads /proc/config.gz from, for this test (cache emptied)."""
    fake = tmp_path / "config.gz"
    monkeypatch.setattr(
        "stoker.host.netlimits.Path", lambda p: fake if p == "/proc/config.gz" else Path(p)
    )
    netlimits.kernel_tc_support.cache_clear()
    try:
        yield fake
    finally:
        netlimits.kernel_tc_support.cache_clear()


def test_kernel_tc_support_reads_the_kernel_config(proc_config_gz: Path) -> None:
    proc_config_gz.write_bytes(gzip.compress(KERNEL_CONFIG.encode()))
    # tbf "=y" and htb, ingress, mirred "=m": built in or a module both count as present.
    # fq and police are "is not set": absent, even though FQ_CODEL and POLICE_EXTRA (longer
    # names that start the same) are set. u32: only CLS_U32_MARK is there, so absent. ifb:
    # no line at all, so absent.
    assert netlimits.kernel_tc_support() == {
        "tbf": True,
        "htb": True,
        "fq": False,
        "ingress": True,
        "u32": False,
        "mirred": True,
        "police": False,
        "ifb": False,
    }


def test_kernel_tc_support_without_a_config_knows_nothing(proc_config_gz: Path) -> None:
    # no /proc/config.gz (CONFIG_IKCONFIG_PROC off): unknown, which is not the same as absent
    assert netlimits.kernel_tc_support() == {
        "tbf": None,
        "htb": None,
        "fq": None,
        "ingress": None,
        "u32": None,
        "mirred": None,
        "police": None,
        "ifb": None,
    }
