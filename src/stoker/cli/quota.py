"""``stoker quota ...``: per-VM CPU, memory, disk and network limits."""

from __future__ import annotations

from collections.abc import Callable

import typer
from rich.table import Table

from stoker.cli.common import JSON_OPTION, client, err, handle_errors, out, print_json
from stoker.cli.complete import VM_ARGUMENT
from stoker.cli.tables import WIDE_OPTION, Column, print_listing
from stoker.domain.units import GiB, MiB
from stoker.wire import QuotaOut

app = typer.Typer(
    help="Per-VM quotas: CPU cap, memory, disk size, IOPS and bandwidth, network.",
    no_args_is_help=True,
)

MB = 1_000_000

LABELS = {
    "cpu_percent": "CPU",
    "memory_mib": "Memory",
    "disk_gib": "Disk size",
    "disk_iops": "Disk IOPS",
    "disk_bytes_per_s": "Disk bandwidth",
    "network_mbps": "Network",
    "network_pps": "Packets",
}

STATUS_STYLE = {
    "enforced": "green",
    "pending": "yellow",
    "failed": "red",
    "not enforceable": "red",
    "unlimited": "dim",
}


def register(root: typer.Typer) -> None:
    """Add this module's commands to the root ``stoker`` command."""
    root.add_typer(app, name="quota")


Number = float | int

#: How each limit's value reads (the API gives plain numbers in the quota's units).
LIMIT_FORMAT: dict[str, Callable[[Number], str]] = {
    "cpu_percent": lambda v: f"{v}% ({v / 100:g} cores)",
    "memory_mib": "{} MiB".format,
    "disk_gib": "{} GiB".format,
    "disk_iops": "{} ops/s".format,
    "disk_bytes_per_s": lambda v: f"{v / MB:g} MB/s",
    "network_mbps": lambda v: f"{v:g} Mbps",
    "network_pps": "{} pkt/s".format,
}


def _limit_text(name: str, value: Number | None) -> str:
    return "-" if value is None else LIMIT_FORMAT[name](value)


def _usage_text(name: str, view: QuotaOut) -> str:
    usage = view.usage
    cpu, vmm_memory = usage.get("cpu_percent"), usage.get("memory_bytes")
    iops, bandwidth = usage.get("disk_iops"), usage.get("disk_bytes_per_s")
    if name == "cpu_percent" and cpu is not None:
        return f"{cpu:.1f}%"
    if name == "memory_mib":
        guest = f"guest {usage.get('guest_memory_mib')} MiB"
        if vmm_memory is not None:
            return f"{guest}, VMM {vmm_memory / MiB:.0f} MiB"
        return guest
    if name == "disk_gib":
        return (
            f"{(usage.get('disk_bytes') or 0) / GiB:.2f} GiB "
            f"({(usage.get('disk_allocated_bytes') or 0) / GiB:.2f} GiB allocated)"
        )
    if name == "disk_iops" and iops is not None:
        return f"{iops:.0f} ops/s"
    if name == "disk_bytes_per_s" and bandwidth is not None:
        return f"{bandwidth / MB:.2f} MB/s"
    return "-"


VIOLATION_FOR = {
    "cpu_percent": ("cpu",),
    "memory_mib": ("memory", "oom"),
    "disk_iops": ("disk_iops",),
    "disk_bytes_per_s": ("disk_bytes_per_s",),
}


def _violations_text(name: str, view: QuotaOut) -> str:
    counts = view.violations
    parts = [
        f"{kind}: {counts[kind].episodes}x"
        for kind in VIOLATION_FOR.get(name, ())
        if kind in counts
    ]
    return ", ".join(parts) or "-"


def _print_view(view: QuotaOut) -> None:
    table = Table(title=f"{view.vm} ({view.state})", title_justify="left")
    for column in ("limit", "quota", "from", "status", "usage", "violations"):
        table.add_column(column)
    for name, label in LABELS.items():
        entry = view.limits[name]
        status = entry.status
        table.add_row(
            label,
            _limit_text(name, entry.value),
            entry.source,
            f"[{STATUS_STYLE.get(status, 'white')}]{status}[/]",
            _usage_text(name, view),
            _violations_text(name, view),
        )
    out.print(table)
    for name, entry in view.limits.items():
        if entry.reason and entry.status != "pending":
            err.print(f"[yellow]{LABELS[name]}:[/yellow] {entry.reason}", highlight=False)
    if view.cgroup:
        out.print(f"cgroup: {view.cgroup}", highlight=False)


def _show(view: QuotaOut, as_json: bool, note: str = "", table: bool = True) -> None:
    """JSON for scripts; for people, the quota table and/or a one-line note."""
    if as_json:
        print_json(view)
        return
    if table:
        _print_view(view)
    if note:
        out.print(note)


@app.command("set")
@handle_errors
def set_quota(
    ctx: typer.Context,
    vm: str = VM_ARGUMENT,
    cpu: int | None = typer.Option(None, "--cpu", help="CPU cap, percent of one core (200 = 2)."),
    memory: int | None = typer.Option(None, "--memory", help="Most guest RAM allowed, MiB."),
    disk: int | None = typer.Option(None, "--disk", help="Total drive size allowed, GiB."),
    network: float | None = typer.Option(None, "--network", help="Network bandwidth, Mbps."),
    iops: int | None = typer.Option(None, "--iops", help="Disk operations per second."),
    disk_bw: float | None = typer.Option(None, "--disk-bw", help="Disk bandwidth, MB/s."),
    pps: int | None = typer.Option(None, "--pps", help="Network packets per second."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Set a VM's quota; a running VM gets it at once, or the command says why not.

    Example: stoker quota set web-server --cpu 200 --memory 4096 --disk 100 --network 100
    """
    view = client(ctx).set_quota(
        vm,
        cpu_percent=cpu,
        memory_mib=memory,
        disk_gib=disk,
        network_mbps=network,
        disk_iops=iops,
        disk_bytes_per_s=None if disk_bw is None else round(disk_bw * MB),
        network_pps=pps,
    )
    note = (
        "[green]quota applied to the running VM[/green]"
        if view.state == "running"
        else "quota saved; it applies when the VM starts"
    )
    _show(view, as_json, note)


@app.command("get")
@handle_errors
def get_quota(
    ctx: typer.Context,
    vm: str = VM_ARGUMENT,
    as_json: bool = JSON_OPTION,
) -> None:
    """Show a VM's quota and current usage side by side, with violation counts.

    Example: stoker quota get web-server
    """
    _show(client(ctx).get_quota(vm), as_json)


@app.command("list")
@handle_errors
def list_quotas(ctx: typer.Context, wide: bool = WIDE_OPTION, as_json: bool = JSON_OPTION) -> None:
    """Every VM's effective quota.

    Example: stoker quota list
    """
    views = client(ctx).list_quotas()
    if as_json:
        print_json(views)
        return
    rows = []
    for view in views:
        cells = []
        for name in LABELS:
            entry = view.limits[name]
            text = _limit_text(name, entry.value) if wide else _short_limit(name, entry.value)
            if entry.status in ("failed", "not enforceable"):
                text = f"[red]{text} ({entry.status})[/]"
            cells.append(text)
        total = sum(v.episodes for v in view.violations.values())
        rows.append([view.vm, view.state, *cells, str(total)])
    print_listing(LIST_COLUMNS, rows, wide, empty="no VMs")


#: the limits a narrow terminal shows; the rest with --wide
NARROW_LIMITS = ("cpu_percent", "memory_mib", "disk_gib", "network_mbps")

LIST_COLUMNS = (
    Column("VM", key=True),
    Column("STATE"),
    *(Column(label.upper(), wide=name not in NARROW_LIMITS) for name, label in LABELS.items()),
    Column("VIOLATIONS", justify="right"),
)


def _short_limit(name: str, value: Number | None) -> str:
    """A limit in a narrow column: the number and unit alone."""
    if value is None:
        return "-"
    if name == "cpu_percent":
        return f"{value}%"
    return _limit_text(name, value)


@app.command("remove")
@handle_errors
def remove_quota(
    ctx: typer.Context,
    vm: str = VM_ARGUMENT,
    as_json: bool = JSON_OPTION,
) -> None:
    """Remove a VM's own quota; the configured defaults apply again.

    Example: stoker quota remove web-server
    """
    view = client(ctx).remove_quota(vm)
    _show(view, as_json, f"quota override of {view.vm} removed; defaults apply", table=False)
