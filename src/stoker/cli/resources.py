"""``stoker resources`` and ``stoker top``."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.tree import Tree

from stoker.cli.common import JSON_OPTION, client, handle_errors, out, print_json
from stoker.domain.units import format_duration, format_size
from stoker.wire import NodePointOut, PredictionOut, ResourcesOut, UsageOut, VMMetricsList

SPARK = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 32


@dataclass(frozen=True)
class Series:
    """One row of the trend table: its value now, its history, and its prediction."""

    label: str
    resource: str  # the prediction's name for it
    kind: str  # how to show a value: count, bytes or cores
    now: Callable[[ResourcesOut], float | None]
    past: Callable[[NodePointOut], float | None]


SERIES: tuple[Series, ...] = (
    Series(
        "vCPUs allocated", "cpu_allocated", "count",
        lambda r: r.allocated.vcpus, lambda p: p.vcpus_allocated,
    ),
    Series(
        "memory allocated", "memory_allocated", "bytes",
        lambda r: r.allocated.memory_bytes, lambda p: p.memory_allocated_bytes,
    ),
    Series(
        "CPU used (cores)", "cpu_used", "cores",
        lambda r: r.usage.cpu_used_cores, lambda p: p.cpu_used_cores,
    ),
    Series(
        "memory used (RSS)", "memory_used", "bytes",
        lambda r: r.usage.memory_used_bytes, lambda p: p.memory_used_bytes,
    ),
)  # fmt: skip


def sparkline(values: list[float | None], width: int = SPARK_WIDTH) -> str:
    """Values squeezed into ``width`` bars (the mean of each slice); gaps show as spaces."""
    if not values:
        return ""
    slices: list[float | None] = []
    for i in range(min(width, len(values))):
        lo = i * len(values) // min(width, len(values))
        hi = (i + 1) * len(values) // min(width, len(values))
        known = [v for v in values[lo:hi] if v is not None]
        slices.append(sum(known) / len(known) if known else None)
    known = [v for v in slices if v is not None]
    if not known:
        return " " * len(slices)
    low, high = min(known), max(known)
    span = high - low
    return "".join(
        " "
        if v is None
        else SPARK[0 if span == 0 else min(len(SPARK) - 1, int((v - low) / span * len(SPARK)))]
        for v in slices
    )


def _show(value: float | None, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "bytes":
        return format_size(int(value))
    if kind == "cores":
        return f"{value:.2f}"
    return f"{value:g}"


def _exhaustion(prediction: PredictionOut | None) -> str:
    if prediction is None:
        return "-"
    level = prediction.confidence.level
    if prediction.slope_per_hour is None:
        return f"no trend yet ({prediction.confidence.samples} samples)"
    seconds = prediction.exhausted_in_s
    if seconds is None:
        return f"not growing (confidence {level})"
    if seconds == 0:
        return "[red]exhausted now[/red]"
    return f"in {format_duration(max(1, round(seconds)))} (confidence {level})"


def render_resources(data: ResourcesOut) -> Group:
    cap, alloc, free = data.capacity, data.allocated, data.available
    summary = Table(title="Node capacity", title_justify="left")
    for column in ("", "capacity", "allocated", "available"):
        summary.add_column(column, justify="right" if column else "left")
    summary.add_row("VMs", str(cap.max_vms), str(alloc.vms), str(free.vms))
    summary.add_row(
        "vCPUs",
        f"{cap.vcpus} ({cap.physical_cpus} CPUs x {cap.cpu_overcommit:g})",
        str(alloc.vcpus),
        str(free.vcpus),
    )
    summary.add_row(
        "memory",
        f"{format_size(cap.memory_limit_bytes)} ({cap.memory_headroom:.0%} headroom kept)",
        format_size(alloc.memory_bytes),
        format_size(free.memory_bytes),
    )
    tree = Tree(f"Node total: {cap.vcpus} vCPUs, {format_size(cap.memory_limit_bytes)} RAM")
    for vm in data.vms:
        tree.add(
            f"{vm.name or vm.id}: {vm.vcpus} vCPUs, {format_size(vm.memory_bytes)}"
            f" [dim]({vm.state})[/dim]"
        )
    tree.add(f"Available: {free.vcpus} vCPUs, {format_size(free.memory_bytes)} RAM")

    history = data.history or []
    predictions = {p.resource: p for p in data.predictions}
    trends = Table(title=f"Trend over {format_duration(data.history_duration_s or 0)}",
                   title_justify="left")  # fmt: skip
    for column in ("resource", "now", "history", "growth / h", "exhausted"):
        trends.add_column(column)
    for series in SERIES:
        prediction = predictions.get(series.resource)
        slope = prediction.slope_per_hour if prediction else None
        trends.add_row(
            series.label,
            _show(series.now(data), series.kind),
            sparkline([series.past(p) for p in history]),
            "-" if slope is None else _show(slope, series.kind),
            _exhaustion(prediction),
        )
    alerts = [
        f"[red]ALERT[/red] {a.resource} at {a.value:.0%} (raised at {a.raise_at:.0%})"
        for a in data.alerts
        if a.active
    ]
    return Group(summary, tree, trends, *alerts)


def _cell(value: float | None, kind: str) -> str:
    if value is None:
        return "[dim]n/a[/dim]"
    if kind == "percent":
        return f"{value:.1f}%"
    return format_size(int(value))


#: the measured columns of ``stoker top``: (title, the figure, how to show it)
TOP_FIGURES: tuple[tuple[str, Callable[[UsageOut], float | None], str], ...] = (
    ("CPU", lambda u: u.cpu_percent, "percent"),
    ("MEM (RSS)", lambda u: u.memory_bytes, "bytes"),
    ("DISK READ", lambda u: u.disk_read_bytes, "bytes"),
    ("DISK WRITE", lambda u: u.disk_write_bytes, "bytes"),
    ("NET RX", lambda u: u.net_rx_bytes, "bytes"),
    ("NET TX", lambda u: u.net_tx_bytes, "bytes"),
)


def render_top(data: VMMetricsList) -> Table:
    table = Table(title=f"stoker top (every {data.interval_s:g} s)", title_justify="left")
    table.add_column("VM", justify="left")
    table.add_column("vCPUs", justify="left")
    for title, _, _ in TOP_FIGURES:
        table.add_column(title, justify="right")
    reasons: set[str] = set()
    vms = sorted(data.vms, key=lambda v: -(v.cpu_percent or 0))
    for vm in vms:
        cells = [vm.name, str(vm.vcpus)]
        cells += [_cell(figure(vm), kind) for _, figure, kind in TOP_FIGURES]
        table.add_row(*cells)
        reasons.update(vm.unavailable.values())
    if not vms:
        table.caption = "no running VMs"
    elif reasons:
        table.caption = "n/a: " + "; ".join(sorted(reasons))
    return table


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root ``stoker`` command."""

    @app.command("resources")
    @handle_errors
    def resources(
        ctx: typer.Context,
        history: str = typer.Option(
            "1h", "--history", help="How far back the sparklines go (e.g. 30m, 1h, 1d)."
        ),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Node capacity, what each VM holds, usage trends and predicted exhaustion.

        Example: stoker resources --history 6h
        """
        with client(ctx) as api:
            data = api.resources(history=history)
        if as_json:
            print_json(data)
            return
        out.print(render_resources(data))

    @app.command("top")
    @handle_errors
    def top(
        ctx: typer.Context,
        once: bool = typer.Option(False, "--once", help="Print one frame and exit."),
        refresh: float = typer.Option(
            2.0,
            "--refresh",
            min=0.2,
            help="Seconds between frames (the agent samples every resources.interval_s).",
        ),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """A live table of every running VM's CPU, memory, disk and network.

        Example: stoker top
        """
        with client(ctx) as api:
            if once or as_json:
                data = api.vms_metrics()
                if as_json:
                    print_json(data)
                else:
                    out.print(render_top(data))
                return
            with Live(render_top(api.vms_metrics()), console=out, auto_refresh=False) as live:
                try:
                    while True:
                        time.sleep(refresh)
                        live.update(render_top(api.vms_metrics()), refresh=True)
                except KeyboardInterrupt:
                    pass
