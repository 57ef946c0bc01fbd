"""Reservations against a real SQLite file, history folding, prediction wiring, rendering."""

from __future__ import annotations

import random
import threading
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stoker.cli.resources import render_top, sparkline
from stoker.domain.capacity import Allocation, NodeCapacity, Request
from stoker.domain.spec import VMSpec
from stoker.domain.states import VMState
from stoker.domain.trend import Prediction
from stoker.domain.units import MiB
from stoker.domain.usage import NodeSample, VMSample
from stoker.domain.vm import VM
from stoker.services.errors import Conflict
from stoker.services.resources import CapacityGate, ResourcesConfig, ResourceService
from stoker.store.db import Database
from stoker.store.resources import ResourceStore
from stoker.store.vms import VMStore
from stoker.wire import VMMetricsList

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def make_vm(i: int, vcpus: int = 1, memory_mib: int = 128, state: VMState = VMState.PENDING) -> VM:
    spec = VMSpec(name=f"vm{i}", kernel="/k", vcpus=vcpus, memory_mib=memory_mib)
    return VM(
        id=f"id{i:04d}", name=spec.name, spec=spec, state=state, state_reason="t",
        state_since=NOW, created_at=NOW,
    )  # fmt: skip


@pytest.fixture
def db(tmp_path: Path) -> Database:
    return Database(tmp_path / "s.db")


def gate_for(db: Database, cap: NodeCapacity) -> CapacityGate:
    return CapacityGate(ResourceStore(db), cap, lambda: NOW)


ops = st.lists(
    st.tuples(
        st.sampled_from(["reserve", "release"]),
        st.integers(0, 11),
        st.integers(1, 4),
        st.sampled_from([64, 128, 256, 512]),
    ),
    max_size=60,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=ops, cpus=st.integers(1, 4), memory_mib=st.integers(256, 2048), max_vms=st.integers(0, 8)
)
def test_reservations_never_exceed_capacity_and_release_returns_exactly(
    tmp_path_factory: pytest.TempPathFactory,
    ops: list[tuple[str, int, int, int]],
    cpus: int,
    memory_mib: int,
    max_vms: int,
) -> None:
    db = Database(tmp_path_factory.mktemp("p") / "s.db")
    cap = NodeCapacity(physical_cpus=cpus, memory_bytes=memory_mib * MiB, max_vms=max_vms)
    gate = gate_for(db, cap)
    store = gate.store
    held: dict[str, Request] = {}
    for op, i, vcpus, mem in ops:
        vm = make_vm(i, vcpus, mem)
        before = store.allocated()
        if op == "reserve":
            try:
                gate.reserve(vm)
            except Conflict as exc:
                assert vm.id not in held
                assert exc.members["resource"] in ("vms", "vcpus", "memory")
                assert "asked for" in exc.detail or "VM slots" in exc.detail
                assert store.allocated() == before
                continue
            held.setdefault(vm.id, Request(vcpus, mem * MiB))
        else:
            gate.release(vm.id)
            gate.release(vm.id)  # idempotent
            gone = held.pop(vm.id, None)
            after = store.allocated()
            if gone is None:
                assert after == before
            else:
                assert before.vcpus - after.vcpus == gone.vcpus
                assert before.memory_bytes - after.memory_bytes == gone.memory_bytes
                assert before.vms - after.vms == 1
        now = store.allocated()
        assert now.vms <= cap.max_vms
        assert now.vcpus <= cap.vcpu_limit
        assert now.memory_bytes <= cap.memory_limit_bytes
        assert now == Allocation(
            vms=len(held),
            vcpus=sum(r.vcpus for r in held.values()),
            memory_bytes=sum(r.memory_bytes for r in held.values()),
        )
    db.close()


def test_conflict_names_resource_asked_and_free(db: Database) -> None:
    cap = NodeCapacity(physical_cpus=8, memory_bytes=400 * MiB, memory_headroom=0.2)
    gate = gate_for(db, cap)
    gate.reserve(make_vm(1, memory_mib=256))
    with pytest.raises(Conflict) as caught:
        gate.reserve(make_vm(2, memory_mib=128))
    assert caught.value.detail == (
        "cannot start vm2: not enough memory: asked for 128 MiB, 64 MiB free of 320 MiB "
        "(host headroom 20% kept free)"
    )


def test_reservation_survives_reopening_the_database(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    db = Database(path)
    gate_for(db, NodeCapacity(physical_cpus=2, memory_bytes=1024 * MiB)).reserve(make_vm(1))
    db.close()
    again = ResourceStore(Database(path))
    assert again.allocated() == Allocation(vms=1, vcpus=1, memory_bytes=128 * MiB)


def test_threads_racing_reserve_exactly_what_fits(tmp_path: Path) -> None:
    """Two connections (as two agents or threads would have) cannot both take the last slot."""
    path = tmp_path / "s.db"
    Database(path).close()
    cap = NodeCapacity(physical_cpus=64, memory_bytes=320 * MiB, memory_headroom=0.2)
    won: list[str] = []
    lost: list[str] = []

    def attempt(i: int) -> None:
        gate = gate_for(Database(path), cap)
        try:
            gate.reserve(make_vm(i))
            won.append(f"id{i:04d}")
        except Conflict:
            lost.append(f"id{i:04d}")

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 2 and len(lost) == 6  # 256 MiB reservable: two 128 MiB VMs
    assert ResourceStore(Database(path)).allocated().vms == 2


def test_reconcile_repairs_after_a_crash(db: Database) -> None:
    vms = VMStore(db)
    store = ResourceStore(db)
    running = make_vm(1, vcpus=2, memory_mib=256, state=VMState.RUNNING)
    stopped = make_vm(2, state=VMState.STOPPED)
    vms.insert(running)
    vms.insert(stopped)
    store.reserve("ghost", Request(1, MiB), NOW, lambda _a: None)
    store.reserve(stopped.id, Request(1, MiB), NOW, lambda _a: None)
    dropped, added = store.reconcile(["running"], ["pending", "stopped"], NOW)
    assert (dropped, added) == (2, 1)
    assert store.allocated() == Allocation(vms=1, vcpus=2, memory_bytes=256 * MiB)


def _node(t: float, **kw: Any) -> NodeSample:
    base: dict[str, Any] = dict(
        t=t, resolution_s=1.0, vms=1, vcpus_allocated=1, memory_allocated=128 * MiB,
        cpu_used=0.5, memory_used=200 * MiB, host_cpu_percent=10.0, host_memory_used=1e9,
    )  # fmt: skip
    base.update(kw)
    return NodeSample(**base)


def _vm(t: float, written: float) -> VMSample:
    return VMSample("v1", t, 1.0, 50.0, 100.0, 0.0, written, None, None)


def test_compaction_folds_old_samples_and_drops_beyond_history(db: Database) -> None:
    store = ResourceStore(db)
    now = 100_000.0
    for k in range(0, 7200, 10):  # two hours, one sample every 10 s
        t = now - 7200 + k
        store.add_samples(_node(t, cpu_used=float(k)), [_vm(t, written=float(k))])
    store.compact(now, raw_keep_s=3600, bucket_s=300, keep_s=5400)
    # Worked out by hand. Samples at t = 92_800, 92_810, ..., 99_990 (720; k = t - 92_800).
    # Dropped: a row covering [t, t + 1) wholly older than now - keep_s = 94_600, so
    #   t <= 94_590: 180 rows; 540 are left (t = 94_600..99_990).
    # Cut: (100_000 - 3600) // 300 * 300 = 321 * 300 = 96_300 (aligned down to a bucket edge).
    # Raw: t = 96_300..99_990 stay as they are: (99_990 - 96_300) / 10 + 1 = 370 rows.
    # Folded: t = 94_600..96_290 (170 rows) into buckets t // 300 = 315..320: 6 rows, each
    #   stamped at its bucket's start, 315 * 300 = 94_500 up to 320 * 300 = 96_000.
    node = store.node_samples(0)
    raw = [s for s in node if s.resolution_s == 1.0]
    folded = [s for s in node if s.resolution_s == 300]
    assert len(raw) == 370
    assert (raw[0].t, raw[-1].t) == (96_300, 99_990)
    assert len(folded) == 6
    assert [s.t for s in folded] == [94_500, 94_800, 95_100, 95_400, 95_700, 96_000]
    assert {s.resolution_s for s in node} == {1.0, 300}
    # gauges average: bucket 94_500 holds k = 1800..1990 (its first 10 samples were dropped),
    # mean 1895; bucket 94_800 holds k = 2000..2290, mean 2145
    assert [s.cpu_used for s in folded[:2]] == [1895.0, 2145.0]
    # counters keep the last value of their bucket: k = 1990 in the first, 2290 in the second
    vm = [s for s in store.vm_samples("v1", 0) if s.resolution_s == 300]
    assert [s.disk_write_bytes for s in vm[:2]] == [1990.0, 2290.0]
    assert vm[0].cpu_percent == 50.0
    store.compact(now, raw_keep_s=3600, bucket_s=300, keep_s=5400)
    assert store.node_samples(0) == node  # folding again changes nothing


def _service(db: Database, **cfg: Any) -> ResourceService:
    config = ResourcesConfig.model_validate(cfg)
    cap = NodeCapacity(physical_cpus=4, memory_bytes=10_000 * MiB)
    # fakes: the service only asks the lifecycle for a VMM and publishes events
    lifecycle: Any = SimpleNamespace(vmm=lambda _id: None)
    events: Any = SimpleNamespace(published=[])
    events.publish = lambda *a, **k: events.published.append((a, k))
    return ResourceService(
        config,
        ResourceStore(db),
        lifecycle,
        events,
        cap,
        {},
        clock=lambda: NOW,
    )


def _by(svc: ResourceService, now_t: float) -> dict[str, Prediction]:
    return {p.resource: p for p in svc.predict(now_t)}


def test_linear_memory_growth_predicts_exhaustion_within_5_percent(db: Database) -> None:
    svc = _service(db, prediction_window_s=3600)
    limit = svc.capacities()["memory_used"]
    now = 1_000_000.0
    rate = 1 * MiB  # per second
    for k in range(60):
        t = now - 3540 + k * 60
        svc.store.add_samples(_node(t, memory_used=1000 * MiB + rate * (t - now)), [])
    expected = (limit - 1000 * MiB) / rate
    got = _by(svc, now)["memory_used"]
    assert got.exhausted_in_s == pytest.approx(expected, rel=0.05)
    assert got.confidence.level == "high" and got.confidence.n == 60


def test_flat_series_predicts_no_exhaustion(db: Database) -> None:
    svc = _service(db)
    now = 1_000_000.0
    for k in range(30):
        svc.store.add_samples(_node(now - 1800 + k * 60), [])
    found = _by(svc, now)
    assert found["cpu_used"].exhausted_in_s is None
    assert found["memory_allocated"].exhausted_in_s is None


def test_noise_lowers_confidence(db: Database) -> None:
    rng = random.Random(7)
    now = 1_000_000.0
    clean, noisy = _service(db), _service(Database(":memory:"))
    for k in range(60):
        t = now - 3540 + k * 60
        clean.store.add_samples(_node(t, cpu_used=0.01 + k * 0.01), [])
        noisy.store.add_samples(_node(t, cpu_used=0.01 + k * 0.01 + rng.uniform(-1, 1)), [])
    a, b = _by(clean, now)["cpu_used"].confidence, _by(noisy, now)["cpu_used"].confidence
    assert a.level == "high"
    assert b.r2 is not None and a.r2 is not None and b.r2 < a.r2
    assert b.level in ("low", "medium")


def test_too_few_samples_give_no_prediction(db: Database) -> None:
    svc = _service(db)
    svc.store.add_samples(_node(999_990.0), [])
    got = _by(svc, 1_000_000.0)["cpu_used"]
    assert got.slope_per_hour is None and got.confidence.level == "none"


def test_config_accepts_durations_and_rejects_bad_values() -> None:
    durations = ResourcesConfig.model_validate({"interval_s": "1s", "history_s": "2h"})
    assert durations.history_s == 7200
    with pytest.raises(ValueError):
        ResourcesConfig(interval_s=0.5)


def test_sparkline_and_top_rendering() -> None:
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == "▁▂▃▄▅▆▇█"
    assert sparkline([5, 5, 5]) == "▁▁▁"
    assert sparkline([None, 1, None]) == " ▁ "
    table = render_top(
        VMMetricsList.model_validate(
            {
                "interval_s": 1,
                "vms": [
                    {
                        "id": "a" * 16, "name": "web", "at": "2026-01-01T00:00:00Z", "vcpus": 1,
                        "cpu_percent": 12.5, "memory_bytes": 200 * MiB, "disk_read_bytes": None,
                        "disk_write_bytes": None, "net_rx_bytes": None, "net_tx_bytes": None,
                        "unavailable": {"net_rx_bytes": "user-mode"},
                    }
                ],
            }
        )
    )  # fmt: skip
    assert table.row_count == 1 and "user-mode" in str(table.caption)
