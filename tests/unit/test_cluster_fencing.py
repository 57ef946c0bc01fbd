"""The fence clock: when a node may run cluster VMs and when it must kill them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stoker.cluster.fencing import Fence, Standing, renew_interval


def fence(base: float = 100.0, ttl: float = 5.0) -> Fence:
    return Fence(ttl=ttl, fraction=0.6, kill_budget=0.5, base=base)


def test_deadline_is_the_fraction_of_the_ttl_minus_the_kill_budget() -> None:
    f = fence()
    assert f.window == pytest.approx(2.5)
    assert f.deadline == pytest.approx(102.5)
    assert f.guard_deadline == pytest.approx(102.75)
    assert f.earliest_expiry == pytest.approx(105.0)


def test_standing_goes_alive_at_risk_fenced_and_back_on_a_renewal() -> None:
    f = fence()
    assert f.standing(101.0) == Standing.ALIVE
    f.renewal_failed()
    assert f.standing(101.0) == Standing.AT_RISK
    assert f.may_run(102.4)
    assert f.standing(102.5) == Standing.FENCED
    assert not f.may_run(102.5)
    f.renewed(sent_at=103.0)  # a late renewal proves the lease still lives
    assert f.standing(103.1) == Standing.ALIVE
    assert f.deadline == pytest.approx(105.5)


def test_a_renewal_never_moves_the_base_back() -> None:
    f = fence()
    f.renewed(sent_at=99.0)
    assert f.base == 100.0


def test_an_outage_round_before_the_deadline_holds_and_extends() -> None:
    f = fence()
    f.renewal_failed()
    assert f.outage_round(started=102.0, finished=102.1, etcd_down=True)
    assert f.standing(103.0) == Standing.HOLD
    assert f.deadline == pytest.approx(104.5)  # from the round's start, not its end


def test_an_outage_round_that_ends_after_the_deadline_proves_nothing() -> None:
    f = fence()
    f.renewal_failed()
    assert not f.outage_round(started=102.4, finished=102.6, etcd_down=True)
    assert f.standing(102.6) == Standing.FENCED


def test_a_round_that_finds_etcd_up_somewhere_ends_the_hold() -> None:
    f = fence()
    f.renewal_failed()
    f.outage_round(102.0, 102.1, etcd_down=True)
    f.outage_round(103.0, 103.1, etcd_down=False)
    assert f.standing(103.2) == Standing.AT_RISK
    assert f.standing(104.5) == Standing.FENCED  # the last qualifying round's deadline


def test_a_lease_etcd_says_is_gone_is_final_until_a_new_one() -> None:
    f = fence()
    f.lease_gone()
    f.renewed(sent_at=101.0)
    f.outage_round(101.0, 101.1, etcd_down=True)
    assert f.standing(100.5) == Standing.EXPIRED
    assert not f.may_run(100.5)


def test_a_window_that_is_not_positive_is_refused() -> None:
    with pytest.raises(ValueError, match="not positive"):
        Fence(ttl=1.0, fraction=0.3, kill_budget=0.5, base=0.0)


def test_renewals_come_at_least_four_times_per_window() -> None:
    assert renew_interval(5.0, 2.5) == pytest.approx(0.625)
    assert renew_interval(60.0, 35.5) == pytest.approx(8.875)
    assert renew_interval(3.0, 3.0) == pytest.approx(0.75)


@given(
    ttl=st.integers(min_value=2, max_value=60),
    fraction=st.floats(min_value=0.3, max_value=0.8),
    budget=st.floats(min_value=0.05, max_value=1.0),
    events=st.lists(
        st.tuples(
            st.sampled_from(["renew", "fail", "round-down", "round-up"]),
            st.floats(min_value=0, max_value=10),
        ),
        max_size=30,
    ),
)
def test_the_kill_always_ends_before_the_lease_can_expire(
    ttl: int, fraction: float, budget: float, events: list[tuple[str, float]]
) -> None:
    """Whatever happens, the moment the node must have finished killing (deadline + budget)
    is before etcd may expire the lease (base + TTL), by the TTL's unused fraction."""
    if ttl * fraction - budget <= 0:
        return
    f = Fence(ttl=float(ttl), fraction=fraction, kill_budget=budget, base=0.0)
    now = 0.0
    for kind, step in events:
        now += step
        if kind == "renew":
            f.renewed(now)
        elif kind == "fail":
            f.renewal_failed()
        else:
            f.outage_round(now, now + 0.01, etcd_down=kind == "round-down")
        assert f.deadline + budget <= f.earliest_expiry - (1 - fraction) * ttl + 1e-9
        assert f.guard_deadline < f.earliest_expiry
