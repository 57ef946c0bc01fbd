"""tc limits on a real TAP inside a throwaway network namespace, read back from the kernel."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from pyroute2 import netns as pr_netns

from stoker.host import netlimits, tap

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for netns and tc")
TEN_MBPS = 1_250_000  # bytes/s


@pytest.fixture
def ns() -> Iterator[str]:
    name = "stoker-test-" + uuid.uuid4().hex[:8]
    pr_netns.create(name)
    try:
        yield name
    finally:
        pr_netns.remove(name)
        assert name not in pr_netns.listnetns()


def test_tap_lifecycle(ns: str) -> None:
    assert not tap.tap_exists("tap-a", ns)
    index = tap.create_tap("tap-a", ns)
    assert tap.create_tap("tap-a", ns) == index  # idempotent
    assert tap.tap_exists("tap-a", ns)
    with pytest.raises(tap.NetDeviceError, match="not a TAP"):
        tap.create_tap("lo", ns)
    tap.delete_tap("tap-a", ns)
    tap.delete_tap("tap-a", ns)
    assert not tap.tap_exists("tap-a", ns)


def test_missing_netns_is_an_error() -> None:
    with pytest.raises(tap.NetDeviceError, match="does not exist"):
        tap.create_tap("tap-a", "stoker-no-such-ns-" + uuid.uuid4().hex[:6])


def test_egress_limit_readback_change_clear(ns: str) -> None:
    tap.create_tap("tap-a", ns)
    netlimits.apply_egress_limit("tap-a", TEN_MBPS, 16_000, netns=ns)
    q = netlimits.read_qdisc("tap-a", ns)
    assert (q["kind"], q["rate"], q["burst"]) == ("tbf", TEN_MBPS, 16_000)

    netlimits.apply_egress_limit("tap-a", 2 * TEN_MBPS, 32_000, netns=ns)  # live change
    q = netlimits.read_qdisc("tap-a", ns)
    assert (q["kind"], q["rate"], q["burst"]) == ("tbf", 2 * TEN_MBPS, 32_000)

    netlimits.clear_limits("tap-a", ns)
    assert netlimits.read_qdisc("tap-a", ns)["kind"] != "tbf"
    netlimits.clear_limits("tap-a", ns)  # idempotent


def test_both_directions(ns: str) -> None:
    tap.create_tap("tap-b", ns)
    shaped = netlimits.shape_tap("tap-b", TEN_MBPS, TEN_MBPS // 2, 16_000, netns=ns)
    q = netlimits.read_qdisc("tap-b", ns)
    print(shaped, q)
    assert shaped.guest_rx and q["rate"] == TEN_MBPS
    if not shaped.guest_tx:
        pytest.skip(f"guest transmit cannot be shaped on this kernel: {shaped.note}")
    assert q["ingress_redirect"]
    assert (q["ifb"]["kind"], q["ifb"]["rate"]) == ("tbf", TEN_MBPS // 2)
    # live change of the guest-transmit side
    netlimits.apply_ingress_limit("tap-b", TEN_MBPS // 4, 16_000, netns=ns)
    assert netlimits.read_qdisc("tap-b", ns)["ifb"]["rate"] == TEN_MBPS // 4
    netlimits.clear_limits("tap-b", ns)
    q = netlimits.read_qdisc("tap-b", ns)
    assert q["kind"] != "tbf" and not q["ingress_redirect"] and "ifb" not in q


def test_packet_rate_is_refused_with_alternative(ns: str) -> None:
    tap.create_tap("tap-c", ns)
    with pytest.raises(netlimits.PacketRateUnsupported, match="Firecracker"):
        netlimits.apply_packet_rate_limit("tap-c", 10_000, ns)
