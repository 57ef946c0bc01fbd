"""Report arithmetic, and a daily report built from known samples in a temp database."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from stoker.domain import report as R
from stoker.domain.schedules import ScheduleRecord
from stoker.domain.spec import VMSpec
from stoker.domain.states import VMState
from stoker.domain.trend import Confidence, Prediction
from stoker.domain.usage import NodeSample, VMSample
from stoker.domain.vm import VM
from stoker.services.errors import InvalidSpec, NotFound
from stoker.services.reports import ReportGenerator
from stoker.store.db import Database
from stoker.store.events import EventStore
from stoker.store.resources import ResourceStore
from stoker.store.schedules import ScheduleStore
from stoker.store.vms import VMStore

UTC_TZ = ZoneInfo("UTC")
BERLIN = ZoneInfo("Europe/Berlin")
D = datetime(2026, 3, 2, tzinfo=UTC)  # a Monday


def at(hours: float) -> datetime:
    return D + timedelta(hours=hours)


# ---------------------------------------------------------------------------- periods


def test_period_labels_and_bounds():
    daily = R.period_for("daily", date(2026, 3, 2), UTC_TZ)
    assert (daily.label, daily.start, daily.end) == ("daily-2026-03-02", D, at(24))
    weekly = R.period_for("weekly", date(2026, 3, 4), UTC_TZ)
    assert weekly.label == "weekly-2026-W10" and weekly.start == D and weekly.end == at(24 * 7)
    monthly = R.period_for("monthly", date(2026, 2, 14), UTC_TZ)
    assert monthly.label == "monthly-2026-02"
    assert monthly.seconds == 28 * 86400
    # a spring-forward day in Berlin is 23 hours long and starts at local midnight
    dst = R.period_for("daily", date(2026, 3, 29), BERLIN)
    assert dst.start == datetime(2026, 3, 28, 23, tzinfo=UTC) and dst.seconds == 23 * 3600
    # ISO week 1 of 2027 starts on Monday 2027-01-04; 2027-01-01 is in 2026-W53
    assert R.period_for("weekly", date(2027, 1, 1), UTC_TZ).label == "weekly-2026-W53"


def test_last_complete_period():
    now = datetime(2026, 3, 4, 0, 5, tzinfo=UTC)  # Wednesday
    assert R.last_complete_day("daily", now, UTC_TZ) == date(2026, 3, 3)
    assert R.last_complete_day("weekly", now, UTC_TZ) == date(2026, 3, 1)  # last Sunday
    assert R.last_complete_day("monthly", now, UTC_TZ) == date(2026, 2, 28)


# ----------------------------------------------------------------------------- uptime


def test_uptime_from_transitions():
    transitions = [
        (at(-5), "pending"),
        (at(-4), "starting"),
        (at(-4) + timedelta(seconds=30), "running"),  # running when the day begins
        (at(6), "stopping"),
        (at(6) + timedelta(seconds=10), "stopped"),
        (at(18), "starting"),
        (at(18) + timedelta(seconds=20), "running"),
    ]
    up = R.time_in_state(transitions, at(0), at(24))
    assert up.observed_s == 24 * 3600
    assert up.running_s == pytest.approx((6 + 6) * 3600 - 20)
    assert up.uptime_percent == pytest.approx(100 * (12 * 3600 - 20) / 86400)


def test_uptime_counts_only_while_the_vm_existed():
    up = R.time_in_state([(at(12), "pending"), (at(18), "running")], at(0), at(24))
    assert up.observed_s == 12 * 3600 and up.uptime_percent == 50.0
    assert R.time_in_state([], at(0), at(24)).uptime_percent is None


# ---------------------------------------------------------------------------- samples


def pts(*pairs: tuple[float, float], res: float = 60.0) -> list[R.Point]:
    return [R.Point(D.timestamp() + t, v, res) for t, v in pairs]


def test_one_sample_is_a_moment_not_a_duration():
    one = pts((0, 50.0))
    assert R.integrate(one, "interval") is None
    assert R.gauge_stats(one, "trapezoid") is None
    assert R.counter_increase(one) is None
    assert R.integrate([], "trapezoid") is None


def test_integration_skips_gaps_instead_of_inventing_data():
    # 100 % for 2 minutes, then a 2-hour hole, then 2 more minutes at 50 %
    series = pts((0, 100), (60, 100), (120, 100), (7320, 50), (7380, 50), (7440, 50))
    integral = R.integrate(series, "interval")
    assert integral.covered_s == 240
    assert integral.total == pytest.approx(100 * 120 + 50 * 120)
    stats = R.gauge_stats(series, "interval")
    assert stats.peak == 100 and stats.average == pytest.approx(75)


def test_counter_increase_survives_a_reset():
    assert R.counter_increase(pts((0, 100), (60, 300), (120, 50), (180, 80))) == 200 + 50 + 30


def test_no_data_renders_as_no_data():
    assert R.fmt(None) == "no data" and R.fmt_bytes(None) == "no data"
    assert R.fmt_bytes(3 * 1024**3) == "3.00 GiB"


# --------------------------------------------------------------- a day, end to end


@pytest.fixture
def day(tmp_path):
    """A day with known facts: web runs 12 h of it at a flat 50 % CPU and 256 MiB; idle
    exists all day but never runs and has no samples."""
    db = Database(tmp_path / "stoker.db")
    vms, events, resources = VMStore(db), EventStore(db), ResourceStore(db)
    web = _vm(vms, "web", at(-1), vcpus=2, memory_mib=512)
    _move(vms, web, [(at(6), "starting"), (at(6) + timedelta(seconds=1), "running")])
    _move(
        vms,
        web,
        [(at(12), "restarting"), (at(12) + timedelta(seconds=1), "running")],
    )
    _move(vms, web, [(at(18), "stopping"), (at(18) + timedelta(seconds=1), "stopped")])
    _vm(vms, "idle", at(-1))
    # samples every 60 s while web runs (06:00 .. 18:00): CPU 50 %, 256 MiB, counters grow
    t0 = at(6).timestamp()
    for i in range(12 * 60 + 1):
        t = t0 + 60 * i
        resources.add_samples(
            NodeSample(t, 60, 1, 2, 512 * 2**20, 0.5, 256 * 2**20, 30.0, 2 * 2**30),
            [
                VMSample(
                    "id-web", t, 60, 50.0, 256 * 2**20, 1000.0 * i, 2000.0 * i, 10.0 * i, 5.0 * i
                )
            ],
        )
    resources.add_samples(  # a sample from the next day must not count
        NodeSample(at(25).timestamp(), 60, 1, 2, 0, 9.0, 9e12, 99.0, 9e12),
        [VMSample("id-web", at(25).timestamp(), 60, 999.0, 9e12, 9e12, 9e12, 9e12, 9e12)],
    )
    for kind, hour, data in (
        ("vm.health", 7, {"from_health": "healthy", "to_health": "unhealthy"}),
        ("vm.health", 7.5, {"from_health": "unhealthy", "to_health": "healthy"}),
        ("vm.health", 8, {"from_health": "healthy", "to_health": "unhealthy"}),
        ("quota.violation", 9, {"resource": "memory"}),
        ("snapshot.created", 10, {}),
        ("snapshot.pruned", 10.5, {}),
        ("vm.health", 30, {"to_health": "unhealthy"}),  # tomorrow
    ):
        events.append(at(hour), "id-web", kind, f"web: {kind}", data)
    schedules = ScheduleStore(db)
    schedules.insert(
        ScheduleRecord(
            "s1",
            None,
            "start",
            "web",
            None,
            "0 6 * * *",
            "UTC",
            0,
            600,
            {},
            True,
            at(-1),
            at(-1),
            at(-1),
        )
    )
    run = schedules.claim("s1", "cron", at(6), fire_at=at(6))
    schedules.finish(
        run.id, "succeeded", at(6), "started", [{"vm_id": "id-web", "status": "succeeded"}]
    )
    schedules.record_missed("s1", [at(6) + timedelta(hours=1)], at(7))
    gen = ReportGenerator(
        db,
        tmp_path,
        UTC_TZ,
        resources,
        predictor=lambda: [
            Prediction("memory_allocated", 1.5, 7200.0, Confidence(40, 0.95, "high")),
            Prediction("cpu_used", None, None, Confidence(2, None, "none")),
        ],
        clock=lambda: at(30),
    )
    return gen, tmp_path


def _vm(vms: VMStore, name: str, created: datetime, **spec) -> VM:
    vm = VM(
        id=f"id-{name}",
        name=name,
        spec=VMSpec(name=name, kernel="/boot/vmlinuz", **spec),
        state=VMState.PENDING,
        state_reason="created",
        state_since=created,
        created_at=created,
    )
    vms.insert(vm)
    return vm


def _move(vms: VMStore, vm: VM, steps: list[tuple[datetime, str]]) -> None:
    for when, to in steps:
        current = vms.get(vm.id).state
        assert vms.compare_and_set_state(vm.id, current, VMState(to), "test", when)


async def test_daily_report_from_known_samples(day):
    gen, data_dir = day
    doc = await gen.generate("daily", date(2026, 3, 2))
    assert doc["label"] == "daily-2026-03-02" and doc["partial"] is False
    web = next(v for v in doc["vms"] if v["name"] == "web")
    # running 06:00:01 .. 12:00 and 12:00:01 .. 18:00: 12 h less 2 s
    assert web["running_hours"] == pytest.approx(12 - 2 / 3600)
    assert web["uptime_percent"] == pytest.approx(100 * (12 - 2 / 3600) / 24)
    # 50 % of one core for the 12 sampled hours
    assert web["cpu_hours_used"] == pytest.approx(6.0)
    assert web["cpu_percent_peak"] == 50.0 and web["cpu_percent_average"] == pytest.approx(50)
    # allocated while holding a reservation (starting .. stopping): 06:00 .. 18:00:01
    assert web["cpu_hours_allocated"] == pytest.approx(2 * (12 + 1 / 3600))
    assert web["memory_gib_hours"] == pytest.approx(0.25 * 12)
    assert web["memory_gib_hours_allocated"] == pytest.approx(0.5 * (12 + 1 / 3600))
    assert web["disk_read_bytes"] == 1000.0 * 720 and web["disk_write_bytes"] == 2000.0 * 720
    assert web["net_rx_bytes"] == 7200.0 and web["net_tx_bytes"] == 3600.0
    assert (web["restarts"], web["failures"]) == (1, 0)
    assert (web["health_failures"], web["quota_violations"]) == (2, 1)
    assert (web["snapshots_taken"], web["snapshots_pruned"]) == (1, 1)
    assert web["schedule_runs"] == {"succeeded": 1}
    assert doc["schedule_runs"]["succeeded"] == 1 and doc["schedule_runs"]["missed"] == 1

    idle = next(v for v in doc["vms"] if v["name"] == "idle")
    assert idle["uptime_percent"] == 0.0
    for figure in ("cpu_hours_used", "memory_gib_hours", "disk_read_bytes", "cpu_percent_peak"):
        assert idle[figure] is None, f"{figure} has no samples: no data, not zero"

    node = doc["node"]
    assert node["cpu_hours_used"] == pytest.approx(6.0)
    assert node["cpu_cores_used_peak"] == 0.5 and node["host_cpu_percent_average"] == 30.0
    assert node["memory_bytes_used_peak"] == 256 * 2**20
    assert node["health_failures"] == 2
    assert doc["prediction"][0]["exhausted_in_s"] == 7200.0

    text = (data_dir / "reports" / "daily-2026-03-02.txt").read_text()
    on_disk = json.loads((data_dir / "reports" / "daily-2026-03-02.json").read_text())
    assert on_disk == doc
    assert "stoker daily report daily-2026-03-02" in text
    assert "uptime                   50.0 %" in text
    assert "CPU-hours used           6.00  (allocated 24.00)" in text
    assert "memory_allocated: runs out in 2.0 h (confidence high)" in text
    assert "cpu_used: no data (not enough samples for a trend)" in text
    idle_block = text.split("VM idle")[1]
    assert "CPU-hours used           no data" in idle_block
    assert "memory GiB-hours         no data" in idle_block
    assert "disk read/written        no data / no data" in idle_block
    assert not list((data_dir / "reports").glob(".*.tmp")), "writes are atomic, no leftovers"


async def test_reports_list_get_and_errors(day):
    gen, _ = day
    await gen.generate("daily", date(2026, 3, 2))
    await gen.generate("weekly", date(2026, 3, 2))
    labels = [r["label"] for r in gen.all()]
    assert labels == ["weekly-2026-W10", "daily-2026-03-02"]
    assert gen.all()[0]["partial"] is True  # the week is not over at 'now'
    doc, text = gen.get("daily-2026-03-02")
    assert doc["label"] == "daily-2026-03-02" and text.startswith("stoker daily report")
    with pytest.raises(NotFound):
        gen.get("daily-2020-01-01")
    with pytest.raises(InvalidSpec):
        gen.get("../../etc/passwd")
    with pytest.raises(InvalidSpec, match="in the future"):
        await gen.generate("daily", date(2030, 1, 1))
    with pytest.raises(InvalidSpec, match="period"):
        await gen.generate("hourly")
