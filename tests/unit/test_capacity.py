"""Capacity arithmetic: reservations never exceed the node, and the boundary is exact."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stoker.domain.capacity import (
    Allocation,
    NodeCapacity,
    Request,
    available,
    check_fit,
    release,
    reserve,
    shortfalls,
)
from stoker.domain.units import GiB, MiB

caps = st.builds(
    NodeCapacity,
    physical_cpus=st.integers(1, 64),
    memory_bytes=st.integers(0, 256 * GiB),
    max_vms=st.integers(0, 60),
    cpu_overcommit=st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0]),
    memory_headroom=st.sampled_from([0.0, 0.1, 0.2, 0.5]),
)
requests = st.builds(Request, vcpus=st.integers(0, 16), memory_bytes=st.integers(0, 16 * GiB))


def within(cap: NodeCapacity, a: Allocation) -> bool:
    return (
        a.vms <= cap.max_vms
        and a.vcpus <= cap.vcpu_limit
        and a.memory_bytes <= cap.memory_limit_bytes
    )


def test_derived_limits() -> None:
    cap = NodeCapacity(physical_cpus=16, memory_bytes=32 * GiB)
    assert cap.vcpu_limit == 32
    assert cap.memory_limit_bytes == int(32 * GiB * 0.8)
    assert NodeCapacity(physical_cpus=3, memory_bytes=0, cpu_overcommit=0.7).vcpu_limit == 2
    assert NodeCapacity(physical_cpus=10, memory_bytes=0, cpu_overcommit=0.7).vcpu_limit == 7


@given(cap=caps, ops=st.lists(st.tuples(st.booleans(), requests), max_size=80))
def test_random_reserve_release_never_exceeds_capacity(
    cap: NodeCapacity, ops: list[tuple[bool, Request]]
) -> None:
    alloc = Allocation()
    held: list[Request] = []
    for do_reserve, req in ops:
        if do_reserve:
            if check_fit(cap, alloc, req) is None:
                alloc = reserve(alloc, req)
                held.append(req)
        elif held:
            alloc = release(alloc, held.pop(0))
        assert within(cap, alloc)
        free = available(cap, alloc)
        assert free.vms + alloc.vms == cap.max_vms
        assert free.vcpus + alloc.vcpus == cap.vcpu_limit
        assert free.memory_bytes + alloc.memory_bytes == cap.memory_limit_bytes
    for req in held:
        alloc = release(alloc, req)
    assert alloc == Allocation()


@given(
    alloc=st.builds(
        Allocation,
        vms=st.integers(0, 100),
        vcpus=st.integers(0, 100),
        memory_bytes=st.integers(0, 64 * GiB),
    ),
    req=requests,
)
def test_reserve_then_release_is_identity(alloc: Allocation, req: Request) -> None:
    assert release(reserve(alloc, req), req) == alloc


def test_release_more_than_reserved_is_a_bug() -> None:
    with pytest.raises(ValueError, match="more than is reserved"):
        release(Allocation(vms=1, vcpus=1, memory_bytes=MiB), Request(2, MiB))
    with pytest.raises(ValueError):
        release(Allocation(), Request(0, 0))


@given(cap=caps, used=st.builds(Request, vcpus=st.integers(0, 8), memory_bytes=st.integers(0, GiB)))
def test_fit_is_exact_at_the_boundary(cap: NodeCapacity, used: Request) -> None:
    alloc = Allocation(vms=0, vcpus=used.vcpus, memory_bytes=used.memory_bytes)
    free = available(cap, alloc)
    exact = Request(free.vcpus, free.memory_bytes)
    if cap.max_vms >= 1:
        assert check_fit(cap, alloc, exact) is None
    over_cpu = check_fit(cap, alloc, Request(free.vcpus + 1, 0))
    assert over_cpu is not None
    assert over_cpu.resource == ("vms" if cap.max_vms == 0 else "vcpus")
    over_mem = shortfalls(cap, alloc, Request(0, free.memory_bytes + 1))
    assert [s.resource for s in over_mem if s.resource != "vms"] == ["memory"]


def test_vm_count_boundary() -> None:
    cap = NodeCapacity(physical_cpus=4, memory_bytes=8 * GiB, max_vms=2)
    assert check_fit(cap, Allocation(vms=1), Request(1, MiB)) is None
    short = check_fit(cap, Allocation(vms=2), Request(1, MiB))
    assert short is not None and short.resource == "vms"
    assert "VM" in short.message() and "2" in short.message()


def test_messages_name_the_resource_and_the_numbers() -> None:
    cap = NodeCapacity(physical_cpus=2, memory_bytes=24 * GiB)
    alloc = Allocation(vms=3, vcpus=3, memory_bytes=cap.memory_limit_bytes - 300 * MiB)
    mem = check_fit(cap, alloc, Request(1, 512 * MiB))
    assert mem is not None
    assert mem.message() == (
        "not enough memory: asked for 512 MiB, 300 MiB free of 19660 MiB "
        "(host headroom 20% kept free)"
    )
    cpu = check_fit(cap, alloc, Request(2, MiB))
    assert cpu is not None
    assert cpu.message() == (
        "not enough vCPUs: asked for 2, 1 free of 4 (2 physical CPUs x 2 overcommit)"
    )


def test_over_reserved_node_reports_zero_free() -> None:
    cap = NodeCapacity(physical_cpus=1, memory_bytes=GiB)
    free = available(cap, Allocation(vms=99, vcpus=10, memory_bytes=2 * GiB))
    assert free == Allocation(0, 0, 0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"physical_cpus": 0, "memory_bytes": GiB},
        {"physical_cpus": 1, "memory_bytes": -1},
        {"physical_cpus": 1, "memory_bytes": GiB, "memory_headroom": 1.0},
        {"physical_cpus": 1, "memory_bytes": GiB, "cpu_overcommit": 0},
    ],
)
def test_bad_capacity_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        NodeCapacity(**kwargs)  # type: ignore[arg-type]
