"""Shell completion of VM names, snapshot ids and schedule ids, asked of the agent.

Completion runs before any command does, so the root options (``--socket``, ``--url``,
``--token-file``) are read from the parsed parameters, not from the context object the root
callback would have set. An agent that cannot be reached, or says no, completes nothing: a
completion never prints an error into the operator's command line.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import typer

from stoker.client import Client, StokerError

#: a completion must not hang the shell when the agent is slow or gone
TIMEOUT_S = 2.0


def _client(ctx: typer.Context) -> Client:
    params = ctx.find_root().params
    token_file = params.get("token_file")
    token = None
    if token_file:
        try:
            token = Path(token_file).read_text().strip() or None
        except (OSError, UnicodeDecodeError):
            token = None
    return Client(
        socket=params.get("socket"),
        url=params.get("url"),
        token=token or os.environ.get("STOKER_TOKEN"),
        timeout=TIMEOUT_S,
    )


def _quietly(ctx: typer.Context, ask: Callable[[Client], list[str]], incomplete: str) -> list[str]:
    try:
        with _client(ctx) as api:
            words = ask(api)
    except (StokerError, OSError, ValueError):
        return []
    return sorted({w for w in words if w.startswith(incomplete)})


def vm_names(ctx: typer.Context, incomplete: str) -> list[str]:
    """VM names; ids too once something is typed (an empty word lists names only)."""

    def words(api: Client) -> list[str]:
        vms = api.list_vms()
        return [vm.name for vm in vms] + ([vm.id for vm in vms] if incomplete else [])

    return _quietly(ctx, words, incomplete)


def snapshot_ids(ctx: typer.Context, incomplete: str) -> list[str]:
    return _quietly(ctx, lambda api: [s.id for s in api.list_snapshots()], incomplete)


def schedule_refs(ctx: typer.Context, incomplete: str) -> list[str]:
    """Schedule ids, and the names of the schedules that have one."""
    return _quietly(
        ctx,
        lambda api: [w for s in api.list_schedules() for w in (s.id, s.name) if w],
        incomplete,
    )


VM_ARGUMENT = typer.Argument(
    ..., help="VM name or id (or a unique id prefix).", autocompletion=vm_names
)
SNAPSHOT_ARGUMENT = typer.Argument(
    ..., help="Snapshot id (or a unique prefix of it).", autocompletion=snapshot_ids
)
SCHEDULE_ARGUMENT = typer.Argument(
    ..., help="Schedule id or name (or a unique id prefix).", autocompletion=schedule_refs
)
