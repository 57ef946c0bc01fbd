"""``stoker events``: the event log, and ``-f`` to follow it live."""

from __future__ import annotations

import json

import typer
from rich.markup import escape

from stoker.cli.common import client, handle_errors, iso, out
from stoker.cli.complete import vm_names
from stoker.cli.tables import WIDE_OPTION
from stoker.domain.events import EventType
from stoker.wire import EventOut

#: by event type (the wire gives the type as a plain string)
LEVEL_STYLE: dict[str, str] = {
    EventType.VM_HEALTH: "magenta",
    EventType.VM_RESTART_LIMIT_REACHED: "red",
    EventType.VM_WATCHDOG: "red",
    EventType.VM_RESTART_FAILED: "red",
    EventType.VM_AUTO_RESTART: "yellow",
    EventType.VM_RESTART_SCHEDULED: "yellow",
}


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root ``stoker`` command."""
    app.command("events")(events)


@handle_errors
def events(
    ctx: typer.Context,
    follow: bool = typer.Option(False, "-f", "--follow", help="Keep printing new events."),
    vm: str | None = typer.Option(
        None, "--vm", help="Only this VM (name or id).", autocompletion=vm_names
    ),
    type: str | None = typer.Option(
        None, "--type", "-t", help="Only this type, or a prefix ending in '*' (vm.*)."
    ),
    since: str | None = typer.Option(
        None, "--since", help="ISO time or a duration back from now (10m, 2h)."
    ),
    limit: int = typer.Option(50, "--limit", "-n", min=1, max=10_000, help="How many to show."),
    wide: bool = WIDE_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print JSON lines, one per event."),
) -> None:
    """Show what happened: state changes, health changes, restarts, hook results, alerts.

    Example: stoker events -f --vm web
    """
    with client(ctx) as api:
        logged = api.events(vm=vm, since=since, type=type, limit=limit)
        last = 0
        for event in logged:
            _show(event, as_json, wide)
            last = event.id
        if not follow:
            return
        try:
            for event in api.stream_events(vm=vm, type=type, after=last):
                _show(event, as_json, wide)
        except KeyboardInterrupt:
            return


def _show(event: EventOut, as_json: bool, wide: bool = False) -> None:
    if as_json:
        # JSON lines: one object per line, so `stoker events -f --json | jq` works (the
        # indented client.dumps would spread one event over many lines)
        typer.echo(json.dumps(event.model_dump(mode="json"), sort_keys=True))
        return
    style = LEVEL_STYLE.get(event.type, "cyan")
    at = iso(event.at).replace("T", " ")[:23]
    line = f"[dim]{at}[/] [{style}]{event.type:<24}[/] {escape(event.message)}"
    if wide:  # the VM's id and the event's own fields, on the same line
        details = json.dumps(event.data, sort_keys=True) if event.data else ""
        line += f" [dim]vm={event.vm_id or '-'} {escape(details)}[/]"
        out.print(line, highlight=False, soft_wrap=True)
    else:
        out.print(line, highlight=False)
