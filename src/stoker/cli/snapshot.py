"""``stoker snapshot ...``: snapshots, restore, verify, retention policies and pruning."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import typer
from rich.table import Table

from stoker.cli import progress
from stoker.cli.common import (
    JSON_OPTION,
    ago,
    client,
    fail,
    handle_errors,
    iso,
    out,
    print_json,
    show_answer,
)
from stoker.cli.complete import SNAPSHOT_ARGUMENT, VM_ARGUMENT, vm_names
from stoker.cli.tables import WIDE_OPTION, Column, print_listing
from stoker.domain.units import format_size
from stoker.wire import AutoSnapshotOut, PolicyOut, PruneOut, SnapshotOut, VMOut

app = typer.Typer(
    help="Snapshots: create, restore, verify, retention policies and pruning.",
    no_args_is_help=True,
)

T = TypeVar("T")


def register(root: typer.Typer) -> None:
    """Add this module's commands to the root ``stoker`` command."""
    root.add_typer(app, name="snapshot")


def _run(what: str, quiet: bool, call: Callable[[], T]) -> T:
    """``call()`` under a spinner: snapshot calls answer only when the work is done."""
    return progress.run(what, quiet, call)


def _size(n: int | None) -> str:
    return "-" if n is None else format_size(n)


def _verdict(ok: bool) -> str:
    return "[green]ok[/]" if ok else "[red]FAILED[/]"


def _verified(s: SnapshotOut) -> str:
    v = s.last_verification
    if not v:
        return "[dim]never[/]"
    return f"{_verdict(v.ok)}{' deep' if v.deep else ''} {ago(v.at)}"


def _columns(with_vm: bool) -> list[Column]:
    return [
        Column("ID", key=True),
        *([Column("VM", key=True)] if with_vm else []),
        Column("CREATED"),
        Column("AT (UTC)", wide=True),
        Column("KIND"),
        Column("CONTENT", wide=True),
        Column("SIZE", justify="right"),
        Column("PROTECTED", wide=True),
        Column("VERIFIED"),
        Column("TAGS", wide=True),
    ]


def _cells(s: SnapshotOut, with_vm: bool) -> list[str]:
    return [
        s.id,
        *([s.vm_name] if with_vm else []),
        ago(s.created_at),
        f"{iso(s.created_at)[:19].replace('T', ' ')}Z",
        s.kind,
        "memory+disks" if s.with_memory else "disks",
        _size(s.size_bytes),
        "yes" if s.protected else "",
        _verified(s),
        ", ".join(s.tags),
    ]


def _print_list(snaps: list[SnapshotOut], with_vm: bool, wide: bool = False) -> None:
    rows = [_cells(s, with_vm) for s in snaps]
    print_listing(_columns(with_vm), rows, wide, empty="no snapshots")


def _print_created(snap: SnapshotOut, show_pause: bool = True) -> None:
    pause = ""
    if show_pause and snap.pause_s:
        pause = f", guest paused {snap.pause_s * 1000:.0f} ms"
    out.print(
        f"snapshot [bold]{snap.id}[/] of {snap.vm_name} created ({_size(snap.size_bytes)}{pause})",
        highlight=False,
    )


def _print_snapshot(s: SnapshotOut) -> None:
    out.print(f"[bold]{s.id}[/]  {s.vm_name}  {s.kind}", highlight=False)
    out.print(f"  created    {iso(s.created_at)} ({ago(s.created_at)})", highlight=False)
    out.print(
        f"  content    {'memory + disks' if s.with_memory else 'disks only'}, "
        f"{_size(s.size_bytes)}",
        highlight=False,
    )
    if s.pause_s is not None:
        out.print(f"  paused     {s.pause_s * 1000:.0f} ms", highlight=False)
    out.print(f"  protected  {'yes' if s.protected else 'no'}", highlight=False)
    if s.tags:
        out.print(f"  tags       {', '.join(s.tags)}", highlight=False)
    v = s.last_verification
    if v:
        out.print(
            f"  verified   {_verified(s)} in {v.duration_s:.2f} s: {v.detail}",
            highlight=False,
        )
    else:
        out.print("  verified   never", highlight=False)
    for f in s.files or []:
        out.print(f"  file       {f.name}  {_size(f.size)}  sha256 {f.sha256}")


def _print_prune(r: PruneOut) -> None:
    verb = "would remove" if r.dry_run else "removed"
    out.print(f"{r.vm_name}: policy {r.policy} (periods in {r.timezone})", highlight=False)
    table = Table(box=None, pad_edge=False)
    for col in ("ACTION", "ID", "CREATED", "SIZE", "WHY"):
        table.add_column(col)
    removed = f"[red]{'remove' if r.dry_run else 'removed'}[/]"
    for action, items in (("[green]keep[/]", r.keep), (removed, r.remove)):
        for item in items:
            table.add_row(
                action,
                item.id,
                iso(item.created_at)[:19],
                _size(item.size_bytes),
                ", ".join(item.reasons),
            )
    out.print(table)
    out.print(
        f"{len(r.keep)} kept, {len(r.remove)} {verb}, "
        f"{_size(r.freed_bytes)} {'would be ' if r.dry_run else ''}freed",
        highlight=False,
    )


def _print_restored(vm: VMOut, snapshot_id: str) -> None:
    out.print(
        f"{vm.name} restored from {snapshot_id}: {vm.state} ({vm.state_reason})",
        highlight=False,
    )


def _print_policy(p: PolicyOut) -> None:
    out.print(
        f"{p.vm_name}: retention {p.retention or 'none'} (periods in {p.timezone}), "
        f"automatic snapshots {('every ' + p.interval) if p.interval else 'off'}"
        + (f", next {iso(p.next_auto_at)}" if p.next_auto_at else ""),
        highlight=False,
    )


def _print_auto(result: AutoSnapshotOut) -> None:
    _print_created(result.snapshot, show_pause=False)
    if result.prune:
        _print_prune(result.prune)


@app.command("create")
@handle_errors
def create(
    ctx: typer.Context,
    vm: str = VM_ARGUMENT,
    tag: list[str] = typer.Option([], "--tag", help="A tag; repeatable."),
    protect: bool = typer.Option(False, "--protect", help="Never remove it by pruning."),
    pre_update: bool = typer.Option(
        False, "--pre-update", help="A pre-update snapshot: kept until released (unprotect)."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Snapshot a VM: memory and disks if it runs (paused briefly), disks if stopped.

    Example: stoker snapshot create web-server --tag before-upgrade
    """
    kind = "pre-update" if pre_update else "manual"
    with client(ctx) as api:
        snap = _run(
            f"snapshotting {vm}",
            as_json,
            lambda: api.create_snapshot(vm, kind=kind, tags=tag, protected=protect or None),
        )
    show_answer(snap, as_json, _print_created)


@app.command("list")
@handle_errors
def list_(
    ctx: typer.Context,
    vm: str | None = typer.Argument(
        None, help="Only this VM (name, id or id prefix).", autocompletion=vm_names
    ),
    wide: bool = WIDE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """List snapshots, oldest first.

    Example: stoker snapshot list web-server
    """
    with client(ctx) as api:
        snaps = api.list_snapshots(vm)
    show_answer(snaps, as_json, lambda found: _print_list(found, with_vm=vm is None, wide=wide))


@app.command("show")
@handle_errors
def show(
    ctx: typer.Context,
    snapshot_id: str = SNAPSHOT_ARGUMENT,
    as_json: bool = JSON_OPTION,
) -> None:
    """Show one snapshot: content, files with checksums, last verification.

    Example: stoker snapshot show 20261121-063000-a1b2c3
    """
    with client(ctx) as api:
        snap = api.get_snapshot(snapshot_id)
    show_answer(snap, as_json, _print_snapshot)


@app.command("restore")
@handle_errors
def restore(
    ctx: typer.Context,
    snapshot_id: str = SNAPSHOT_ARGUMENT,
    as_name: str | None = typer.Option(
        None,
        "--as",
        help="Create a new VM of this name from the snapshot instead (the snapshot's VM, "
        "if it still exists, is not touched); the only way for a snapshot kept after its "
        "VM was deleted.",
    ),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Put a VM back to a snapshot: stops it, restores disks and memory, runs it again.

    Example: stoker snapshot restore 20261121-063000-a1b2c3 --yes
    Example: stoker snapshot restore 20261121-063000-a1b2c3 --as web-restored
    """
    with client(ctx) as api:
        snap = api.get_snapshot(snapshot_id)
        if (
            as_name is None
            and not yes
            and not typer.confirm(
                f"restore {snap.vm_name} to {snap.id}? Its current disks and memory are lost"
            )
        ):
            raise typer.Exit(1)
        target = as_name or snap.vm_name
        result = _run(
            f"restoring {target} from {snap.id}",
            as_json,
            lambda: api.restore_snapshot(snap.id, as_name=as_name),
        )
    show_answer(result, as_json, lambda r: _print_restored(r.vm, snap.id))


@app.command("verify")
@handle_errors
def verify(
    ctx: typer.Context,
    snapshot_id: str = SNAPSHOT_ARGUMENT,
    deep: bool = typer.Option(
        False, "--deep", help="Also run it in a throwaway VM until ready (never the original)."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Recompute checksums (and check qcow2 images); --deep also runs it. Exit 1 on failure.

    Example: stoker snapshot verify 20261121-063000-a1b2c3 --deep
    """
    with client(ctx) as api:
        snap = _run(
            f"verifying {snapshot_id}{' (deep)' if deep else ''}",
            as_json,
            lambda: api.verify_snapshot(snapshot_id, deep=deep),
        )
    v = snap.last_verification
    if v is None:  # the agent answers a verify with its result: this is a broken agent
        raise fail(f"the agent verified {snapshot_id} but gave no result; try again")
    if as_json:
        print_json(snap)
    else:
        out.print(f"{snap.id}: {_verdict(v.ok)} in {v.duration_s:.2f} s: {v.detail}")
    if not v.ok:
        raise typer.Exit(1)


@app.command("delete")
@handle_errors
def delete(
    ctx: typer.Context,
    snapshot_id: str = SNAPSHOT_ARGUMENT,
    force: bool = typer.Option(False, "--force", help="Delete even if protected."),
) -> None:
    """Delete a snapshot and free its space.

    Example: stoker snapshot delete 20261121-063000-a1b2c3
    """
    with client(ctx) as api:
        snapshot_id = api.get_snapshot(snapshot_id).id  # a prefix: say which one went
        api.delete_snapshot(snapshot_id, force=force)
    out.print(f"snapshot {snapshot_id} deleted", highlight=False)


@app.command("prune")
@handle_errors
def prune(
    ctx: typer.Context,
    vm: str = VM_ARGUMENT,
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the plan, remove nothing."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Remove the snapshots the VM's retention policy does not keep.

    Example: stoker snapshot prune web-server --dry-run
    """
    with client(ctx) as api:
        result = _run(f"pruning {vm}", as_json, lambda: api.prune_snapshots(vm, dry_run=dry_run))
    show_answer(result, as_json, _print_prune)


@app.command("protect")
@handle_errors
def protect(ctx: typer.Context, snapshot_id: str = SNAPSHOT_ARGUMENT) -> None:
    """Protect a snapshot: pruning never removes it.

    Example: stoker snapshot protect 20261121-063000-a1b2c3
    """
    with client(ctx) as api:
        snap = api.protect_snapshot(snapshot_id)
    out.print(f"snapshot {snap.id} protected", highlight=False)


@app.command("unprotect")
@handle_errors
def unprotect(ctx: typer.Context, snapshot_id: str = SNAPSHOT_ARGUMENT) -> None:
    """Release a protected or pre-update snapshot to the retention policy.

    Example: stoker snapshot unprotect 20261121-063000-a1b2c3
    """
    with client(ctx) as api:
        snap = api.unprotect_snapshot(snapshot_id)
    out.print(f"snapshot {snap.id} released to the retention policy", highlight=False)


@app.command("set-policy")
@handle_errors
def set_policy(
    ctx: typer.Context,
    vm: str = VM_ARGUMENT,
    retention: str = typer.Argument(
        ...,
        help="Rules like 'daily:7,weekly:4' (last/hourly/daily/weekly/monthly/yearly:N, "
        "within:DURATION); '' for none.",
    ),
    every: str | None = typer.Option(
        None, "--every", help="Automatic snapshot interval while the VM runs, e.g. 1d, 6h."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Set a VM's retention policy (and, with --every, automatic snapshots).

    Example: stoker snapshot set-policy web-server "daily:7,weekly:4" --every 1d
    """
    with client(ctx) as api:
        policy = api.set_snapshot_policy(vm, retention or None, every)
    show_answer(policy, as_json, _print_policy)


@app.command("policy")
@handle_errors
def policy(
    ctx: typer.Context,
    vm: str = VM_ARGUMENT,
    as_json: bool = JSON_OPTION,
) -> None:
    """Show a VM's snapshot policy.

    Example: stoker snapshot policy web-server
    """
    with client(ctx) as api:
        result = api.get_snapshot_policy(vm)
    show_answer(result, as_json, _print_policy)


@app.command("auto-snapshot")
@handle_errors
def auto_snapshot(
    ctx: typer.Context,
    vm: str = VM_ARGUMENT,
    as_json: bool = JSON_OPTION,
) -> None:
    """Take an automatic snapshot now, then prune by the VM's policy.

    Example: stoker snapshot auto-snapshot web-server
    """
    with client(ctx) as api:
        result = _run(f"auto-snapshot of {vm}", as_json, lambda: api.auto_snapshot(vm))
    show_answer(result, as_json, _print_auto)
