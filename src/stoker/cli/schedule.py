"""``stoker schedule ...`` and ``stoker report ...``."""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import typer
from pydantic import BaseModel

from stoker.cli.common import JSON_OPTION, client, fail, handle_errors, out, print_json
from stoker.cli.complete import SCHEDULE_ARGUMENT
from stoker.cli.progress import run as with_progress
from stoker.cli.tables import WIDE_OPTION, Column, print_listing
from stoker.wire import ReportOut, ReportSummary, RunOut, ScheduleOut

schedule_app = typer.Typer(
    help="Run VM operations (start, stop, restart, snapshot) and reports on cron schedules.",
    no_args_is_help=True,
)
report_app = typer.Typer(
    help="Usage reports: uptime, CPU-hours, memory, disk and network, events.",
    no_args_is_help=True,
)

ACTIONS = ("start", "stop", "restart", "snapshot", "report")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root ``stoker`` command."""
    app.add_typer(schedule_app, name="schedule")
    app.add_typer(report_app, name="report")


def _local(when: datetime | str | None, seconds: bool = True) -> str:
    """An API time (UTC; a report summary gives it as text) in this machine's local time."""
    if not when:
        return "-"
    if isinstance(when, str):
        when = datetime.fromisoformat(when.replace("Z", "+00:00"))
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z" if seconds else "%Y-%m-%d %H:%M")


def _selector(items: list[str]) -> dict[str, str] | None:
    if not items:
        return None
    selector = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise fail(f"--selector {item!r}: expected key=value, for example env=dev")
        selector[key] = value
    return selector


Row = TypeVar("Row", bound=BaseModel)


def _print_rows(
    rows: list[Row],
    as_json: bool,
    columns: tuple[Column, ...],
    cells: Callable[[Row], tuple[str, ...]],
    wide: bool = False,
) -> None:
    """The raw JSON with --json, else a table with one line per row."""
    if as_json:
        print_json(rows)
        return
    print_listing(columns, [cells(row) for row in rows], wide)


def _print_report(result: ReportOut, as_json: bool) -> None:
    """The report's JSON with --json, else its text exactly as the file holds it."""
    if as_json:
        print_json(result.report)
        return
    sys.stdout.write(result.text)  # the file as written: no wrapping, no markup


def _target(row: ScheduleOut) -> str:
    if row.vm:
        return row.vm
    if row.selector:
        return ",".join(f"{k}={v}" for k, v in row.selector.items())
    return "(node)"


# ------------------------------------------------------------------------------ schedule


@schedule_app.command("add")
@handle_errors
def add(
    ctx: typer.Context,
    args: list[str] = typer.Argument(
        ...,
        metavar="[VM] ACTION CRON",
        help="VM name (leave out with --selector or for 'report'), the action "
        "(start, stop, restart, snapshot, report) and a 5-field cron expression or @daily.",
    ),
    selector: list[str] = typer.Option(
        [], "--selector", "-l", help="Target every VM with label key=value; repeatable."
    ),
    tz: str | None = typer.Option(None, "--tz", help="IANA time zone (default: the agent's)."),
    spread: float = typer.Option(
        0, "--spread", min=0, help="Stagger starts over this many seconds (stable per VM)."
    ),
    grace: float | None = typer.Option(
        None, "--grace", min=0, help="Run a fire missed while the agent was down if this late."
    ),
    name: str | None = typer.Option(None, "--name", help="Optional unique schedule name."),
    period: str | None = typer.Option(None, help="For 'report': daily, weekly or monthly."),
    force: bool = typer.Option(False, "--force", help="For 'stop'/'restart': not graceful."),
    disabled: bool = typer.Option(False, "--disabled", help="Create it disabled."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Add a schedule.

    Examples:
      stoker schedule add web-server start "0 8 * * 1-5"
      stoker schedule add web-server stop "0 18 * * *"
      stoker schedule add --selector env=dev start "0 8 * * 1-5" --spread 120
      stoker schedule add report "0 1 * * 1" --period weekly
    """
    if len(args) == 3:
        vm, action, cron = args
    elif len(args) == 2:
        vm, (action, cron) = None, args
    else:
        raise fail(
            'give VM ACTION CRON, for example: stoker schedule add web-server start "0 8 * * 1-5"'
            " (quote the cron expression)"
        )
    if action not in ACTIONS:
        raise fail(f"unknown action {action!r}; use one of {', '.join(ACTIONS)}")
    options: dict[str, Any] = {}
    if period is not None:
        options["period"] = period
    if force:
        options["graceful"] = False
    fields: dict[str, Any] = {"spread_s": spread, "enabled": not disabled, "options": options}
    for key, value in (("tz", tz), ("grace_s", grace), ("name", name)):
        if value is not None:
            fields[key] = value
    with client(ctx) as api:
        row = api.create_schedule(action, cron, vm=vm, selector=_selector(selector), **fields)
    if as_json:
        print_json(row)
        return
    out.print(
        f"schedule [bold]{row.id}[/bold]: {row.action} {_target(row)} at "
        f"'{row.cron}' ({row.tz}); next run {_local(row.next_fire_at)}",
        highlight=False,
    )


@schedule_app.command("list")
@handle_errors
def list_(ctx: typer.Context, wide: bool = WIDE_OPTION, as_json: bool = JSON_OPTION) -> None:
    """List schedules with their next run in local time.

    Example: stoker schedule list
    """
    with client(ctx) as api:
        rows = api.list_schedules()
    _print_rows(rows, as_json, SCHEDULE_COLUMNS, _schedule_cells, wide)


#: the next run is what a schedule is read for: never cut, like the ids and names
SCHEDULE_COLUMNS = (
    Column("ID", key=True),
    Column("NAME", key=True),
    Column("TARGET", key=True),
    Column("ACTION"),
    Column("CRON"),
    Column("TZ", wide=True),
    Column("NEXT RUN", key=True),
    Column("LAST RUN"),
    Column("LAST RUN AT", wide=True),
)


def _schedule_cells(row: ScheduleOut) -> tuple[str, ...]:
    last = row.last_run
    last_status = last.status if last else "-"
    if row.running_run_id:
        last_status = f"running (run {row.running_run_id})"
    return (
        row.id,
        row.name or "-",
        _target(row),
        row.action,
        row.cron,
        row.tz,
        _local(row.next_fire_at, seconds=False) if row.enabled else "[dim]disabled[/dim]",
        last_status,
        _local(last.started_at) if last else "-",
    )


@schedule_app.command("remove")
@handle_errors
def remove(ctx: typer.Context, ref: str = SCHEDULE_ARGUMENT) -> None:
    """Delete a schedule and its run history.

    Example: stoker schedule remove 3f2a9c1b7d4e
    """
    with client(ctx) as api:
        api.delete_schedule(ref)
    out.print(f"removed schedule {ref}")


@schedule_app.command("enable")
@handle_errors
def enable(ctx: typer.Context, ref: str = SCHEDULE_ARGUMENT) -> None:
    """Enable a schedule (fires while it was disabled are not made up).

    Example: stoker schedule enable 3f2a9c1b7d4e
    """
    with client(ctx) as api:
        row = api.enable_schedule(ref)
    out.print(f"enabled {row.id}; next run {_local(row.next_fire_at)}", highlight=False)


@schedule_app.command("disable")
@handle_errors
def disable(ctx: typer.Context, ref: str = SCHEDULE_ARGUMENT) -> None:
    """Disable a schedule without deleting it.

    Example: stoker schedule disable 3f2a9c1b7d4e
    """
    with client(ctx) as api:
        row = api.disable_schedule(ref)
    out.print(f"disabled {row.id}")


def _print_run(run: RunOut) -> None:
    out.print(
        f"run {run.id} ({run.trigger}): [bold]{run.status}[/bold] {run.message}",
        highlight=False,
    )
    for result in run.results:  # free-form: one per VM or report the run acted on
        who = result.get("vm") or result.get("report") or "node"
        out.print(f"  {who}: {result['status']}: {result['message']}", highlight=False)


@schedule_app.command("run")
@handle_errors
def run(
    ctx: typer.Context,
    ref: str = SCHEDULE_ARGUMENT,
    no_wait: bool = typer.Option(False, "--no-wait", help="Return once the run has started."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Run a schedule now, outside its cron timing.

    Example: stoker schedule run 3f2a9c1b7d4e
    """
    with client(ctx) as api:
        result = with_progress(
            f"running schedule {ref}",
            as_json or no_wait,
            lambda: api.run_schedule(ref, wait=not no_wait),
        )
    if as_json:
        print_json(result)
        return
    _print_run(result)
    if result.status == "failed":
        raise typer.Exit(1)


@schedule_app.command("history")
@handle_errors
def history(
    ctx: typer.Context,
    ref: str = SCHEDULE_ARGUMENT,
    limit: int = typer.Option(20, "--limit", "-n", min=1, max=1000),
    wide: bool = WIDE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Past runs of a schedule, newest first: ran, failed, missed or skipped.

    Example: stoker schedule history 3f2a9c1b7d4e
    """
    with client(ctx) as api:
        runs = api.schedule_runs(ref, limit)
    columns = (
        Column("RUN", key=True),
        Column("TRIGGER"),
        Column("FIRE TIME"),
        Column("STARTED", wide=True),
        Column("STATUS"),
        Column("MESSAGE"),
    )
    _print_rows(runs, as_json, columns, _run_cells, wide)


def _run_cells(run: RunOut) -> tuple[str, ...]:
    return (
        str(run.id),
        run.trigger,
        _local(run.fire_at),
        _local(run.started_at),
        run.status,
        run.message,
    )


# -------------------------------------------------------------------------------- report


def _generate(ctx: typer.Context, period: str, day: str | None, as_json: bool) -> None:
    with client(ctx) as api:
        result = api.generate_report(period, day)
    _print_report(result, as_json)


DATE_OPTION = typer.Option(
    None, "--date", help="A day in the period, YYYY-MM-DD (default: today, so far)."
)


@report_app.command("daily")
@handle_errors
def daily(ctx: typer.Context, date: str | None = DATE_OPTION, as_json: bool = JSON_OPTION) -> None:
    """Generate and print the daily report (also written to <data_dir>/reports/).

    Example: stoker report daily --date 2026-03-02
    """
    _generate(ctx, "daily", date, as_json)


@report_app.command("weekly")
@handle_errors
def weekly(ctx: typer.Context, date: str | None = DATE_OPTION, as_json: bool = JSON_OPTION) -> None:
    """Generate and print the ISO-week report.

    Example: stoker report weekly
    """
    _generate(ctx, "weekly", date, as_json)


@report_app.command("monthly")
@handle_errors
def monthly(
    ctx: typer.Context, date: str | None = DATE_OPTION, as_json: bool = JSON_OPTION
) -> None:
    """Generate and print the monthly report.

    Example: stoker report monthly --date 2026-02-01
    """
    _generate(ctx, "monthly", date, as_json)


@report_app.command("list")
@handle_errors
def list_reports(ctx: typer.Context, wide: bool = WIDE_OPTION, as_json: bool = JSON_OPTION) -> None:
    """Reports written so far, newest first.

    Example: stoker report list
    """
    with client(ctx) as api:
        rows = api.list_reports()
    columns = (Column("REPORT", key=True), Column("GENERATED"), Column("FILE"))
    _print_rows(rows, as_json, columns, _report_cells, wide)


def _report_cells(row: ReportSummary) -> tuple[str, ...]:
    label = row.label + (" (partial)" if row.partial else "")
    return (label, _local(row.generated_at), row.text_path)


@report_app.command("show")
@handle_errors
def show(
    ctx: typer.Context,
    label: str = typer.Argument(..., help="e.g. daily-2026-03-02, weekly-2026-W09"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Print a report already written.

    Example: stoker report show daily-2026-03-02
    """
    with client(ctx) as api:
        result = api.get_report(label)
    _print_report(result, as_json)
