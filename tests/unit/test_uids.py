"""Per-VM uid allocation: never shared by live VMs, never the agent's, freed ids reused last."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stoker.domain.uids import UidRange, UidRangeError, UidsExhausted, allocate_uid


def test_parse_the_config_form() -> None:
    assert UidRange.parse("200000-265535") == UidRange(200000, 265535)
    assert UidRange.parse(" 70000 - 70000 ") == UidRange(70000, 70000)
    assert len(UidRange.parse("200000-200009")) == 10


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("200000", "two numbers"),
        ("200000:265535", "two numbers"),
        ("-5-10", "two numbers"),
        ("abc-def", "two numbers"),
        ("0-100", "1 <= first"),
        ("300-200", "1 <= first"),
        ("60000-70000", "reserved id 65534"),
        ("65535-65535", "reserved id 65535"),
        ("4294967290-4294967295", "<= 4294967294"),
    ],
)
def test_bad_ranges_say_how_to_write_one(text: str, hint: str) -> None:
    with pytest.raises(UidRangeError, match=hint) as info:
        UidRange.parse(text)
    assert "200000-265535" in str(info.value)


def test_lowest_fresh_id_first() -> None:
    r = UidRange(200000, 200009)
    assert allocate_uid(r, live=set()) == 200000
    assert allocate_uid(r, live={200000, 200001}) == 200002
    assert allocate_uid(r, live={200001}) == 200000


def test_agent_ids_are_never_handed_out() -> None:
    r = UidRange(200000, 200002)
    assert allocate_uid(r, live=set(), reserved={200000}) == 200001
    with pytest.raises(UidsExhausted):
        allocate_uid(r, live={200001, 200002}, reserved={200000})


def test_a_freed_id_is_reused_last_and_oldest_first() -> None:
    r = UidRange(200000, 200003)
    # 200000 and 200001 were used and freed: fresh ids go first
    assert allocate_uid(r, live=set(), released=[200001, 200000]) == 200002
    assert allocate_uid(r, live={200002, 200003}, released=[200001, 200000]) == 200001
    assert allocate_uid(r, live={200001, 200002, 200003}, released=[200001, 200000]) == 200000


def test_exhausted_range_says_what_to_do() -> None:
    with pytest.raises(UidsExhausted, match="widen"):
        allocate_uid(UidRange(200000, 200001), live={200000, 200001})


@given(
    live=st.sets(st.integers(200000, 200015)),
    released=st.lists(st.integers(199990, 200020), unique=True),
    reserved=st.sets(st.integers(200000, 200015), max_size=2),
)
def test_allocation_is_always_in_range_and_unshared(
    live: set[int], released: list[int], reserved: set[int]
) -> None:
    r = UidRange(200000, 200015)
    try:
        uid = allocate_uid(r, live, released, reserved)
    except UidsExhausted:
        assert set(r_ids(r)) <= live | reserved
        return
    assert uid in r and uid not in live and uid not in reserved
    fresh = set(r_ids(r)) - live - reserved - set(released)
    if fresh:
        assert uid == min(fresh)
    else:
        assert uid == next(u for u in released if u in r and u not in live | reserved)


def r_ids(r: UidRange) -> range:
    return range(r.first, r.last + 1)
