"""Daily, weekly and monthly usage reports from what was measured.

Sources: the resources capability's sample history (CPU, memory, disk and network per VM,
node totals), the VM state transitions (uptime, restarts, failures), the event log (health
failures, quota violations, snapshots) and the schedule runs. The arithmetic is in
``stoker.domain.report``; this module gathers, renders and writes
``<data_dir>/reports/<label>.txt`` with a ``.json`` beside it, both atomically.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, tzinfo
from pathlib import Path
from typing import Any, Protocol

from stoker.domain import report as R
from stoker.domain.events import Event, EventType
from stoker.domain.vm import VM, Transition
from stoker.host.disk import atomic_write_text
from stoker.services.errors import InvalidSpec, NotFound
from stoker.store.db import Database, to_iso
from stoker.store.events import EventStore
from stoker.store.schedules import ScheduleStore
from stoker.store.vms import VMStore

LABEL_RE = re.compile(r"^(daily-\d{4}-\d{2}-\d{2}|weekly-\d{4}-W\d{2}|monthly-\d{4}-\d{2})$")
#: reports start here: every label has a four-digit year, and nothing was measured before
EARLIEST_DAY = date(1970, 1, 1)
#: states in which a VM holds its reservation (vCPUs and memory are allocated to it)
ALLOCATED_STATES = ("starting", "running", "restarting", "stopping")


class SampleSource(Protocol):
    """The resources capability's history (``stoker.store.resources.ResourceStore``)."""

    def vm_samples(self, vm_id: str, since_t: float, until_t: float | None = None) -> Sequence[Any]:
        """Rows with t, resolution_s, cpu_percent, memory_bytes, disk_read_bytes,
        disk_write_bytes, net_rx_bytes, net_tx_bytes (None when not measured)."""
        ...

    def node_samples(self, since_t: float, until_t: float | None = None) -> Sequence[Any]:
        """Rows with t, resolution_s, vms, cpu_used (cores), memory_used (bytes),
        host_cpu_percent, host_memory_used."""
        ...


Predictor = Callable[[], Any]


def _is_health_failure(event: Event) -> bool:
    """The health capability's verdict turning unhealthy (``vm.health``)."""
    if event.type == EventType.VM_HEALTH:
        return event.data.get("to_health") == "unhealthy"
    return event.type.startswith("health.") and any(w in event.type for w in ("fail", "unhealthy"))


def _is_quota_violation(event: Event) -> bool:
    return event.type.startswith(EventType.QUOTA_VIOLATION)


def _is_snapshot_taken(event: Event) -> bool:
    return event.type == EventType.SNAPSHOT_CREATED


def _is_snapshot_pruned(event: Event) -> bool:
    return event.type == EventType.SNAPSHOT_PRUNED or (
        event.type == EventType.SNAPSHOT_DELETED and bool(event.data.get("pruned"))
    )


EVENT_FIGURES: dict[str, Callable[[Event], bool]] = {
    "health_failures": _is_health_failure,
    "quota_violations": _is_quota_violation,
    "snapshots_taken": _is_snapshot_taken,
    "snapshots_pruned": _is_snapshot_pruned,
}


class ReportGenerator:
    def __init__(
        self,
        db: Database,
        data_dir: Path,
        tz: tzinfo,
        samples: SampleSource | None,
        predictor: Predictor | None = None,
        clock: Callable[[], datetime] | None = None,
        keep: dict[str, int] | None = None,
    ) -> None:
        """``keep``: how many reports of each period to keep on disk, newest first
        (``[history] reports_keep_daily`` ...); a period not named keeps all."""
        self.db = db
        self.keep = dict(keep or {})
        self.vms = VMStore(db)
        self.events = EventStore(db)
        self.schedules = ScheduleStore(db)
        self.dir = data_dir / "reports"
        self.tz = tz
        self.samples = samples
        self.predictor = predictor
        self.clock = clock or (lambda: datetime.now(UTC))

    # ---------------------------------------------------------------------------- public

    def period(self, period: str, day: date | None = None) -> R.ReportPeriod:
        if period not in R.PERIODS:
            raise InvalidSpec("period", f"{period!r} is not one of {', '.join(R.PERIODS)}")
        now = self.clock()
        when = day or now.astimezone(self.tz).date()
        if when < EARLIEST_DAY:
            raise InvalidSpec(
                "date", f"{when.isoformat()} is before {EARLIEST_DAY}: nothing was measured then"
            )
        if when > now.astimezone(self.tz).date():  # checked first: far dates overflow
            raise InvalidSpec("date", f"{when.isoformat()} is in the future: nothing measured yet")
        span = R.period_for(period, when, self.tz)
        if span.start > now:
            raise InvalidSpec("date", f"{when.isoformat()} is in the future: nothing measured yet")
        return span

    async def generate(self, period: str, day: date | None = None) -> dict[str, Any]:
        """Build the report for the period containing ``day`` (default: today, so far) and
        write its .txt and .json; returns the JSON document."""
        span = self.period(period, day)
        return await asyncio.to_thread(self._generate, span)

    def _generate(self, span: R.ReportPeriod) -> dict[str, Any]:
        doc = self.build(span)
        self.dir.mkdir(parents=True, exist_ok=True)
        # JSON first: a listing keys on it, and the text is rendered from the same document
        atomic_write_text(
            self.dir / f"{span.label}.json", json.dumps(doc, indent=2) + "\n", mode=0o600
        )
        atomic_write_text(self.dir / f"{span.label}.txt", render_text(doc), mode=0o600)
        self._prune(span.period)
        return doc

    def _prune(self, period: str) -> None:
        """Bounded history: keep the newest ``keep[period]`` reports of the period."""
        keep = self.keep.get(period)
        if keep is None:
            return
        labels = sorted(
            p.stem for p in self.dir.glob(f"{period}-*.json") if LABEL_RE.fullmatch(p.stem)
        )
        for label in labels[: max(0, len(labels) - keep)]:
            for suffix in (".json", ".txt"):
                (self.dir / f"{label}{suffix}").unlink(missing_ok=True)

    def all(self) -> list[dict[str, Any]]:
        """Reports on disk, newest period first."""
        out = []
        for path in sorted(self.dir.glob("*.json"), reverse=True):
            if not LABEL_RE.fullmatch(path.stem):
                continue
            try:
                doc = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            out.append(
                {
                    "label": path.stem,
                    "period": doc.get("period"),
                    "start": doc.get("start"),
                    "end": doc.get("end"),
                    "generated_at": doc.get("generated_at"),
                    "partial": doc.get("partial", False),
                    "text_path": str(path.with_suffix(".txt")),
                    "json_path": str(path),
                }
            )
        out.sort(key=lambda r: (r["start"] or "", r["label"]), reverse=True)
        return out

    def get(self, label: str) -> tuple[dict[str, Any], str]:
        if not LABEL_RE.fullmatch(label):
            raise InvalidSpec(
                "label", f"{label!r} is not daily-YYYY-MM-DD, weekly-YYYY-Www or monthly-YYYY-MM"
            )
        path = self.dir / f"{label}.json"
        if not path.is_file():
            raise NotFound(f"no report {label}; generate it with POST /api/v1/reports/<period>")
        text_path = path.with_suffix(".txt")
        text = (
            text_path.read_text()
            if text_path.is_file()
            else render_text(json.loads(path.read_text()))
        )
        return json.loads(path.read_text()), text

    # ---------------------------------------------------------------------------- build

    def build(self, span: R.ReportPeriod) -> dict[str, Any]:
        now = self.clock()
        end = min(span.end, now)
        transitions = self.vms.transitions_before(end)
        events = self._events(span.start, end)
        runs = self.schedules.runs_between(span.start, end)
        found = [
            self._vm(vm, span.start, end, transitions.get(vm.id, []), events, runs)
            for vm in self.vms.all()
        ]
        vm_docs = [d for d in found if d is not None]
        run_counts = Counter(run.status for run in runs)
        return {
            "period": span.period,
            "label": span.label,
            "tz": str(self.tz),
            "start": to_iso(span.start),
            "end": to_iso(span.end),
            "measured_until": to_iso(end),
            "partial": end < span.end,
            "generated_at": to_iso(now),
            "vms": vm_docs,
            "node": self._node(span.start, end, vm_docs),
            "schedule_runs": {
                status: run_counts.get(status, 0)
                for status in ("succeeded", "failed", "missed", "skipped", "running")
            },
            "prediction": self._prediction(),
        }

    def _events(self, start: datetime, end: datetime) -> list[Event]:
        found: list[Event] = []
        for prefix in (EventType.VM_HEALTH, "health.*", "quota.*", "snapshot.*"):
            found += [
                e
                for e in self.events.query(since=start, type=prefix, limit=1_000_000)
                if e.at < end
            ]
        return found

    def _vm(
        self,
        vm: VM,
        start: datetime,
        end: datetime,
        transitions: list[Transition],
        events: list[Event],
        runs: Sequence[Any],
    ) -> dict[str, Any] | None:
        pairs = [(t.at, t.to_state) for t in transitions]
        up = R.time_in_state(pairs, start, end, ("running",))
        if up.observed_s <= 0:
            return None  # created after the period: nothing to report
        held = R.time_in_state(pairs, start, end, ALLOCATED_STATES)
        doc: dict[str, Any] = {
            "id": vm.id,
            "name": vm.name,
            "vcpus": vm.spec.vcpus,
            "memory_mib": vm.spec.memory_mib,
            "observed_hours": up.observed_s / 3600,
            "running_hours": up.running_s / 3600,
            "uptime_percent": up.uptime_percent,
            "cpu_hours_allocated": vm.spec.vcpus * held.running_s / 3600,
            "memory_gib_hours_allocated": vm.spec.memory_mib / 1024 * held.running_s / 3600,
            "restarts": _restarts(transitions, start, end),
            "failures": R.count_into(pairs, start, end, "error"),
        }
        doc.update(self._usage(vm.id, start, end))
        mine = [e for e in events if e.vm_id == vm.id]
        for figure, matches in EVENT_FIGURES.items():
            doc[figure] = sum(1 for e in mine if matches(e))
        statuses = Counter(
            run.status for run in runs if any(r.get("vm_id") == vm.id for r in run.results)
        )
        doc["schedule_runs"] = dict(sorted(statuses.items()))
        return doc

    def _usage(self, vm_id: str, start: datetime, end: datetime) -> dict[str, Any]:
        rows = self._vm_rows(vm_id, start, end)
        cpu = R.integrate(R.series(rows, "cpu_percent"), "interval")
        cpu_stats = R.gauge_stats(R.series(rows, "cpu_percent"), "interval")
        mem = R.integrate(R.series(rows, "memory_bytes"), "trapezoid")
        mem_stats = R.gauge_stats(R.series(rows, "memory_bytes"), "trapezoid")
        usage: dict[str, Any] = {
            "samples": len(rows),
            "sampled_hours": (cpu.covered_s / 3600)
            if cpu
            else (mem.covered_s / 3600 if mem else 0.0),
            "cpu_hours_used": cpu.total / 100 / 3600 if cpu else None,
            "cpu_percent_peak": cpu_stats.peak if cpu_stats else None,
            "cpu_percent_average": cpu_stats.average if cpu_stats else None,
            "memory_gib_hours": mem.total / R.GIB / 3600 if mem else None,
            "memory_bytes_peak": mem_stats.peak if mem_stats else None,
            "memory_bytes_average": mem_stats.average if mem_stats else None,
        }
        for column in ("disk_read_bytes", "disk_write_bytes", "net_rx_bytes", "net_tx_bytes"):
            usage[column] = R.counter_increase(R.series(rows, column))
        return usage

    def _vm_rows(self, vm_id: str, start: datetime, end: datetime) -> Sequence[Any]:
        if self.samples is None:
            return []
        return self.samples.vm_samples(vm_id, start.timestamp(), _until(end))

    def _node(
        self, start: datetime, end: datetime, vm_docs: list[dict[str, Any]]
    ) -> dict[str, Any]:
        def total(key: str) -> float | None:
            values = [d[key] for d in vm_docs if d.get(key) is not None]
            return sum(values) if values else None

        node: dict[str, Any] = {
            "vms": len(vm_docs),
            **{
                key: total(key)
                for key in (
                    "running_hours",
                    "cpu_hours_used",
                    "cpu_hours_allocated",
                    "memory_gib_hours",
                    "memory_gib_hours_allocated",
                    "disk_read_bytes",
                    "disk_write_bytes",
                    "net_rx_bytes",
                    "net_tx_bytes",
                )
            },
            **{
                key: sum(d[key] for d in vm_docs)
                for key in (
                    "restarts",
                    "failures",
                    "health_failures",
                    "quota_violations",
                    "snapshots_taken",
                    "snapshots_pruned",
                )
            },
        }
        rows = self.samples.node_samples(start.timestamp(), _until(end)) if self.samples else []
        node["samples"] = len(rows)
        for column, mode, name in (
            ("cpu_used", "interval", "cpu_cores_used"),
            ("memory_used", "trapezoid", "memory_bytes_used"),
            ("host_cpu_percent", "interval", "host_cpu_percent"),
            ("host_memory_used", "trapezoid", "host_memory_bytes_used"),
            ("vms", "trapezoid", "vms_running"),
        ):
            stats = R.gauge_stats(R.series(rows, column), mode)  # type: ignore[arg-type]
            node[f"{name}_peak"] = stats.peak if stats else None
            node[f"{name}_average"] = stats.average if stats else None
        return node

    def _prediction(self) -> Any:
        if self.predictor is None:
            return None
        try:
            value = self.predictor()
        except Exception as exc:  # a report without a forecast beats no report
            return {"error": f"prediction unavailable: {exc}"}
        return _jsonable(value)


def _until(end: datetime) -> float:
    """Sample queries include their upper bound; the period's end is exclusive."""
    return end.timestamp() - 1e-6


def _restarts(transitions: list[Transition], start: datetime, end: datetime) -> int:
    """Restarts of a running VM (into ``restarting``) plus recoveries from an error: a
    start that follows the error clean-up (error -> stopped -> starting)."""
    count = 0
    for before, t in zip([None, *transitions], transitions, strict=False):
        if not start <= t.at < end:
            continue
        if t.to_state == "restarting" or (
            t.to_state == "starting"
            and before is not None
            and before.from_state == "error"
            and before.to_state == "stopped"
        ):
            count += 1
    return count


def _jsonable(value: Any) -> Any:
    """Dataclasses and datetimes from another capability, as plain JSON."""
    from dataclasses import asdict, is_dataclass

    if is_dataclass(value) and not isinstance(value, type):
        return _jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return to_iso(value)
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


# ------------------------------------------------------------------------------- text


def render_text(doc: dict[str, Any]) -> str:
    """The report a person reads with ``cat``: figures with units, "no data" where none."""
    f, b = R.fmt, R.fmt_bytes
    lines = [
        f"stoker {doc['period']} report {doc['label']}",
        f"period   {doc['start']} .. {doc['end']} (UTC; days in {doc['tz']})",
        f"measured until {doc['measured_until']}"
        + ("  (period not over yet: partial)" if doc.get("partial") else ""),
        f"generated {doc['generated_at']}",
        "",
    ]
    node = doc["node"]
    lines += [
        "NODE",
        f"  VMs reported             {node['vms']}",
        f"  CPU-hours used           {f(node['cpu_hours_used'])}"
        f"  (allocated {f(node['cpu_hours_allocated'])})",
        f"  memory GiB-hours used    {f(node['memory_gib_hours'])}"
        f"  (allocated {f(node['memory_gib_hours_allocated'])})",
        f"  CPU cores busy           peak {f(node['cpu_cores_used_peak'])}"
        f"  average {f(node['cpu_cores_used_average'])}",
        f"  VMM memory               peak {b(node['memory_bytes_used_peak'])}"
        f"  average {b(node['memory_bytes_used_average'])}",
        f"  host CPU                 peak {f(node['host_cpu_percent_peak'], '%', 1)}"
        f"  average {f(node['host_cpu_percent_average'], '%', 1)}",
        f"  host memory              peak {b(node['host_memory_bytes_used_peak'])}"
        f"  average {b(node['host_memory_bytes_used_average'])}",
        f"  disk read/written        {b(node['disk_read_bytes'])} / {b(node['disk_write_bytes'])}",
        f"  network rx/tx            {b(node['net_rx_bytes'])} / {b(node['net_tx_bytes'])}",
        f"  restarts {node['restarts']}  failures {node['failures']}"
        f"  health failures {node['health_failures']}"
        f"  quota violations {node['quota_violations']}",
        f"  snapshots taken {node['snapshots_taken']}  pruned {node['snapshots_pruned']}",
        "  schedule runs            "
        + "  ".join(f"{k} {v}" for k, v in doc["schedule_runs"].items()),
        f"  node samples             {node['samples']}",
        "",
        "CAPACITY PREDICTION",
        *_prediction_lines(doc.get("prediction")),
        "",
    ]
    for vm in doc["vms"]:
        lines += [
            f"VM {vm['name']} ({vm['vcpus']} vCPU, {vm['memory_mib']} MiB)",
            f"  uptime                   {f(vm['uptime_percent'], '%', 1)}"
            f"  ({f(vm['running_hours'], 'h')} running of {f(vm['observed_hours'], 'h')})",
            f"  CPU-hours used           {f(vm['cpu_hours_used'])}"
            f"  (allocated {f(vm['cpu_hours_allocated'])})",
            f"  CPU                      peak {f(vm['cpu_percent_peak'], '%', 1)}"
            f"  average {f(vm['cpu_percent_average'], '%', 1)}",
            f"  memory GiB-hours         {f(vm['memory_gib_hours'])}"
            f"  (allocated {f(vm['memory_gib_hours_allocated'])})",
            f"  memory                   peak {b(vm['memory_bytes_peak'])}"
            f"  average {b(vm['memory_bytes_average'])}",
            f"  disk read/written        {b(vm['disk_read_bytes'])} / {b(vm['disk_write_bytes'])}",
            f"  network rx/tx            {b(vm['net_rx_bytes'])} / {b(vm['net_tx_bytes'])}",
            f"  restarts {vm['restarts']}  failures {vm['failures']}"
            f"  health failures {vm['health_failures']}"
            f"  quota violations {vm['quota_violations']}",
            f"  snapshots taken {vm['snapshots_taken']}  pruned {vm['snapshots_pruned']}",
            "  schedule runs            "
            + ("  ".join(f"{k} {v}" for k, v in vm["schedule_runs"].items()) or "none"),
            f"  samples                  {vm['samples']} covering {f(vm['sampled_hours'], 'h')}",
            "",
        ]
    if not doc["vms"]:
        lines += ["no VMs existed during this period", ""]
    return "\n".join(lines)


def _prediction_lines(prediction: Any) -> list[str]:
    if prediction is None:
        return ["  no data (no capacity prediction available)"]
    if isinstance(prediction, dict) and "error" in prediction:
        return [f"  no data ({prediction['error']})"]
    items = prediction if isinstance(prediction, list) else [prediction]
    lines = []
    for item in items:
        if not isinstance(item, dict):
            lines.append(f"  {item}")
            continue
        name = item.get("resource", "?")
        eta = item.get("exhausted_in_s")
        conf = item.get("confidence")
        level = conf.get("level") if isinstance(conf, dict) else conf
        slope = item.get("slope_per_hour")
        if slope is None:
            lines.append(f"  {name}: no data (not enough samples for a trend)")
        elif eta is None:
            lines.append(f"  {name}: not running out (confidence {level})")
        else:
            lines.append(f"  {name}: runs out in {eta / 3600:.1f} h (confidence {level})")
    return lines or ["  no data"]
