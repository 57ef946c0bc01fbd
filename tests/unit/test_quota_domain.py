"""Quota model, merge of defaults and overrides, enforceability per VM setup, violations."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from stoker.domain.capabilities import Capabilities
from stoker.domain.quota import (
    FIELDS,
    Quota,
    Sample,
    check_fits,
    enforceable_part,
    merge,
    plan,
    rates,
    sources,
    violations,
)
from stoker.domain.spec import VMSpec
from stoker.domain.units import GiB, cgroup_v2_cpu_max
from stoker.drivers.firecracker.driver import CAPABILITIES as FC_CAPS
from stoker.drivers.qemu import CAPABILITIES as QEMU_CAPS


def caps(vm: VMSpec) -> Capabilities:
    """What the real driver of the VM's hypervisor declares."""
    return FC_CAPS if vm.hypervisor == "firecracker" else QEMU_CAPS


def spec(**kw: Any) -> VMSpec:
    return VMSpec.model_validate({"name": "web", "kernel": "/k", **kw})


@pytest.mark.parametrize(
    "body",
    [
        {"cpu_percent": 0},
        {"cpu_percent": -10},
        {"memory_mib": 0},
        {"disk_gib": -1},
        {"disk_iops": 0},
        {"disk_bytes_per_s": -5},
        {"network_mbps": 0},
        {"network_pps": -1},
        {"cpus": 2},  # unknown field: a typo must not pass silently
    ],
)
def test_bad_values_are_refused(body: dict[str, int]) -> None:
    with pytest.raises(ValidationError):
        Quota.model_validate(body)


def test_two_hundred_percent_is_two_cores_and_accepted() -> None:
    # a VM override of 200% over a 100% default: the override wins, the default's memory stays
    merged = merge(Quota(cpu_percent=100, memory_mib=512), Quota(cpu_percent=200))
    assert merged.set_fields() == {"cpu_percent": 200, "memory_mib": 512}
    # both bind through the VMM's cgroup, on any hypervisor and network mode; nothing refused
    vm = spec(vcpus=2, memory_mib=512)
    planned = plan(merged, vm, caps(vm))
    assert set(planned.enforced) == {"cpu_percent", "memory_mib"}
    assert "cgroup CPU cap" in planned.enforced["cpu_percent"]
    assert planned.unenforceable == {}
    # two cores is a cap of 200_000 us of CPU time in every 100_000 us period
    assert cgroup_v2_cpu_max(200) == "200000 100000"
    # the bounds: 1% (1 ms of a 100 ms period, the kernel's minimum quota) to 1024 cores
    assert Quota(cpu_percent=1).set_fields() == {"cpu_percent": 1}
    assert Quota(cpu_percent=102_400).set_fields() == {"cpu_percent": 102_400}
    with pytest.raises(ValidationError):
        Quota(cpu_percent=102_401)


def test_merge_override_wins_field_by_field() -> None:
    defaults = Quota(cpu_percent=100, memory_mib=1024, network_mbps=50)
    override = Quota(cpu_percent=200, disk_iops=500)
    merged = merge(defaults, override)
    assert merged.set_fields() == {
        "cpu_percent": 200,
        "memory_mib": 1024,
        "network_mbps": 50,
        "disk_iops": 500,
    }
    assert merge(defaults, None) == defaults
    assert sources(defaults, override)["cpu_percent"] == "vm"
    assert sources(defaults, override)["memory_mib"] == "default"
    assert sources(defaults, override)["disk_gib"] == "none"


@given(
    st.fixed_dictionaries({}, optional={f: st.integers(1, 10_000) for f in FIELDS}),
    st.fixed_dictionaries({}, optional={f: st.integers(1, 10_000) for f in FIELDS}),
)
def test_merge_properties(d: dict[str, int], o: dict[str, int]) -> None:
    merged = merge(Quota.model_validate(d), Quota.model_validate(o))
    for name in FIELDS:
        assert getattr(merged, name) == o.get(name, d.get(name))


def test_memory_below_guest_ram_and_disk_too_big() -> None:
    problems = check_fits(Quota(memory_mib=64, disk_gib=1), spec(memory_mib=128), 2 * GiB)
    fields = {p.field: p.message for p in problems}
    assert "below the guest's RAM of 128 MiB" in fields["memory_mib"]
    assert "2.00 GiB" in fields["disk_gib"]
    assert check_fits(Quota(memory_mib=128, disk_gib=2), spec(memory_mib=128), 2 * GiB) == []


def test_qemu_user_networking_cannot_be_rate_limited() -> None:
    user = spec(network={"mode": "user"})
    refused = plan(Quota(network_mbps=100, network_pps=1000, cpu_percent=50), user, caps(user))
    assert "network mode 'tap'" in refused.unenforceable["network_mbps"]
    assert "network mode 'tap'" in refused.unenforceable["network_pps"]
    assert "cpu_percent" in refused.enforced
    assert enforceable_part(Quota(network_mbps=100, cpu_percent=50), refused).set_fields() == {
        "cpu_percent": 50
    }


def test_qemu_tap_shapes_bandwidth_but_not_packets() -> None:
    tap = spec(network={"mode": "tap", "tap": "tap0"})
    result = plan(Quota(network_mbps=100, network_pps=1000), tap, caps(tap))
    assert "tc" in result.enforced["network_mbps"]
    assert "firecracker" in result.unenforceable["network_pps"]


def test_firecracker_enforces_everything_on_tap() -> None:
    fc = spec(hypervisor="firecracker", network={"mode": "tap", "tap": "tap0"})
    result = plan(Quota(network_mbps=100, network_pps=1000, disk_iops=10), fc, caps(fc))
    assert result.unenforceable == {}
    assert "Firecracker" in result.enforced["network_pps"]
    assert "Firecracker" in result.enforced["disk_iops"]


def test_no_network_means_nothing_to_limit() -> None:
    assert (
        "nothing to limit"
        in plan(Quota(network_mbps=1), spec(), caps(spec())).unenforceable["network_mbps"]
    )


def test_violations_from_counter_deltas() -> None:
    quota = Quota(cpu_percent=50, disk_iops=100, disk_bytes_per_s=1_000_000)
    a = Sample(at=0.0, cpu_usage_usec=0, cpu_throttled=10, memory_failcnt=3, memory_oom_kills=0,
               disk_ops=0, disk_bytes=0)  # fmt: skip
    b = Sample(at=2.0, cpu_usage_usec=1_000_000, cpu_throttled=30, memory_failcnt=5,
               memory_oom_kills=1, disk_ops=190, disk_bytes=500_000)  # fmt: skip
    found = {v.kind: v for v in violations(a, b, quota)}
    assert found["cpu"].amount == 20
    assert found["memory"].amount == 2
    assert found["oom"].amount == 1
    assert found["disk_iops"].amount == 95  # 95 ops/s >= 90% of 100
    assert "disk_bytes_per_s" not in found  # 250 kB/s is far below 1 MB/s
    measured = rates(a, b)
    assert measured.cpu_percent == pytest.approx(50.0)


def test_no_violation_without_change_or_without_cap() -> None:
    a = Sample(at=0.0, cpu_throttled=10)
    assert violations(a, Sample(at=1.0, cpu_throttled=10), Quota(cpu_percent=50)) == []
    # throttling seen without a CPU quota is not a quota violation
    assert violations(a, Sample(at=1.0, cpu_throttled=20), Quota()) == []
    # counters that went backwards (a new cgroup) are not negative violations
    assert violations(Sample(at=0, cpu_throttled=50), Sample(at=1, cpu_throttled=5),
                      Quota(cpu_percent=5)) == []  # fmt: skip
