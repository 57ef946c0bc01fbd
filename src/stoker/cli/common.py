"""What every command shares: the client from global options, errors, and output."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import typer
from pydantic import BaseModel, TypeAdapter
from rich.console import Console
from rich.markup import escape

from stoker.client import AgentUnreachable, Client, StokerError, dumps

out = Console()
err = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

JSON_OPTION = typer.Option(False, "--json", help="Print the raw JSON answer.")


def client(ctx: typer.Context) -> Client:
    obj = ctx.find_root().obj or {}
    token_file = obj.get("token_file")
    token = read_token_file(token_file) if token_file else os.environ.get("STOKER_TOKEN")
    return Client(socket=obj.get("socket"), url=obj.get("url"), token=token)


def read_token_file(path: Path) -> str:
    """The bearer token in ``path`` (one line); a clear error when it cannot be used."""
    try:
        token = path.read_bytes().decode().strip()
    except OSError as exc:
        raise fail(f"--token-file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise fail(f"--token-file {path} is not UTF-8 text") from None
    if not token:
        raise fail(f"--token-file {path} is empty")
    return token


def handle_errors(fn: F) -> F:
    """Turn agent errors into a clear message and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AgentUnreachable as exc:
            err.print(f"[red]error:[/red] {escape(exc.detail)}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except StokerError as exc:
            err.print(f"[red]error:[/red] {escape(exc.detail)}", highlight=False, soft_wrap=True)
            for item in exc.body.get("errors") or []:
                err.print(
                    escape(f"  - {item.get('field')}: {item.get('message')}"),
                    highlight=False,
                    soft_wrap=True,
                )
            if exc.body.get("allowed_actions") is not None:
                allowed = ", ".join(exc.body["allowed_actions"]) or "none"
                err.print(f"  allowed actions: {allowed}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


#: what ``--json`` prints: a model, a list of models, or plain JSON the API nested in one
JSONAnswer = BaseModel | Sequence[BaseModel] | Mapping[str, Any]


def print_json(value: JSONAnswer) -> None:
    sys.stdout.write(dumps(value) + "\n")


Answer = TypeVar("Answer", bound=JSONAnswer)


def show_answer(value: Answer, as_json: bool, render: Callable[[Answer], None]) -> None:
    """A command's answer: the API's JSON as is with --json, else ``render`` for people."""
    if as_json:
        print_json(value)
    else:
        render(value)


_TIME = TypeAdapter(datetime)


def iso(when: datetime) -> str:
    """A time written exactly as the API writes it in JSON ('2026-11-21T06:30:00.123456Z'),
    so messages read the same as the raw answer."""
    return str(_TIME.dump_python(when, mode="json"))


def ago(then: datetime | None) -> str:
    """A time -> '3m ago' for tables."""
    if then is None:
        return "-"
    seconds = (datetime.now(UTC) - then).total_seconds()
    if seconds < 0:
        return "in " + _span(-seconds)
    return _span(seconds) + " ago"


def _span(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m"
    if seconds < 86400:
        return f"{seconds // 3600:.0f}h{(seconds % 3600) // 60:02.0f}m"
    return f"{seconds // 86400:.0f}d"


STATE_STYLE = {
    "running": "green",
    "starting": "yellow",
    "restarting": "yellow",
    "stopping": "yellow",
    "stopped": "dim",
    "pending": "cyan",
    "error": "red",
}


def styled_state(state: str) -> str:
    return f"[{STATE_STYLE.get(state, 'white')}]{state}[/]"
