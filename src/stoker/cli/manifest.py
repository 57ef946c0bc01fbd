"""``stoker plan`` and ``stoker apply``: a manifest's files, read here and sent to the agent.

``plan`` exits 0 when nothing would change and 2 when something would (as ``terraform plan
-detailed-exitcode``), so a script or a CI job can tell the two apart; any error exits 1.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.markup import escape

from stoker.cli.common import JSON_OPTION, client, err, iso, out, print_json
from stoker.client import AgentUnreachable, StokerError, manifest_problems
from stoker.wire import AppliedManifestOut, ManifestFile

app = typer.Typer(
    help="The manifest this agent applied, and what it manages.", no_args_is_help=True
)

F = TypeVar("F", bound=Callable[..., Any])

FILE_OPTION = typer.Option(
    ...,
    "-f",
    "--file",
    help="A manifest: one TOML file, or a directory whose *.toml files are read in name order.",
)
PRUNE_OPTION = typer.Option(
    False, "--prune", help="Delete what an earlier apply created and the manifest no longer has."
)
RESTART_OPTION = typer.Option(
    False, "--restart", help="Restart running VMs whose change needs a restart."
)


def register(root: typer.Typer) -> None:
    """Add ``plan``, ``apply`` and ``manifest`` to the root ``stoker`` command."""
    root.command("plan")(plan)
    root.command("apply")(apply)
    root.add_typer(app, name="manifest")


def read_files(path: Path) -> list[ManifestFile]:
    """The manifest's files with their contents, named as the operator named them."""
    if path.is_dir():
        files = sorted(
            p for p in path.iterdir() if p.suffix == ".toml" and p.is_file() and p.name[0] != "."
        )
        if not files:
            raise _fail(f"{path}: the directory has no *.toml files")
    elif path.exists():
        files = [path]
    else:
        raise _fail(f"{path}: no such file or directory")
    read = []
    for file in files:
        try:
            raw = file.read_bytes()
        except OSError as exc:
            raise _fail(f"{file}: cannot read it: {exc.strerror}") from None
        try:
            read.append(ManifestFile(name=str(file), content=raw.decode("utf-8")))
        except UnicodeDecodeError as exc:
            line = raw.count(b"\n", 0, exc.start) + 1
            raise _fail(f"{file}:{line}: not UTF-8; TOML files must be UTF-8") from None
    return read


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(1)


def manifest_errors(fn: F) -> F:
    """Every error exits 1 (2 is ``plan``'s "changes"); an invalid manifest lists each
    problem as ``file:line: key.path: message``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AgentUnreachable as exc:
            raise _fail(exc.detail) from None
        except StokerError as exc:
            problems = manifest_problems(exc)
            if not problems:
                details = [f"  - {e.get('field')}: {e.get('message')}" for e in _errors(exc)]
                err.print(
                    escape("\n".join([f"error: {exc.detail}", *details])),
                    highlight=False,
                    soft_wrap=True,
                )
                raise typer.Exit(1) from None
            count = len(problems)
            err.print(
                f"[red]error:[/red] the manifest has {count} problem{'s' if count != 1 else ''};"
                " nothing was changed",
                highlight=False,
            )
            for p in problems:
                where = f"{p.file}:{p.line}" if p.line else p.file
                text = (
                    f"  {where}: {p.field}: {p.message}" if p.field else f"  {where}: {p.message}"
                )
                err.print(escape(text), highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _errors(exc: StokerError) -> list[dict[str, Any]]:
    return [e for e in exc.body.get("errors") or [] if isinstance(e, dict)]


def _width() -> int:
    return max(40, min(400, out.width))


@manifest_errors
def plan(
    ctx: typer.Context,
    file: Path = FILE_OPTION,
    prune: bool = PRUNE_OPTION,
    restart: bool = RESTART_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Show what applying a manifest would change, and what was changed by hand since the
    last apply. Exit 0: nothing to do; 2: something to do; 1: an error.

    Example: stoker plan -f examples/host.toml
    """
    files = read_files(file)
    with client(ctx) as api:
        result = api.plan_manifest(files, prune=prune, restart=restart, width=_width())
    if as_json:
        print_json(result)
    else:
        out.print(result.text, end="", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(result.exit_code)


@manifest_errors
def apply(
    ctx: typer.Context,
    file: Path = FILE_OPTION,
    prune: bool = PRUNE_OPTION,
    restart: bool = RESTART_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Make the host what a manifest says: exactly the plan's steps, in dependency order.
    Applying again changes nothing; after an interrupted apply it finishes the job.

    Example: stoker apply -f examples/host.toml --restart
    """
    files = read_files(file)
    with client(ctx) as api:
        result = api.apply_manifest(files, prune=prune, restart=restart, width=_width())
    if as_json:
        print_json(result)
        return
    out.print(result.plan.text, end="", markup=False, highlight=False, soft_wrap=True)
    if result.done:
        out.print(f"\nApplied: {result.done} step{'s' if result.done != 1 else ''} done.")
    pending = result.plan.summary.get("pending-restart", 0)
    if pending:
        out.print(
            f"{pending} VM{'s' if pending != 1 else ''} still need a restart for the changes "
            "marked [restart]: apply --restart restarts them.",
            markup=False,
        )


@app.command("show")
@manifest_errors
def show(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """The manifest last applied (its hash and files) and the objects a manifest manages.

    Example: stoker manifest show
    """
    with client(ctx) as api:
        applied = api.get_manifest()
    if as_json:
        print_json(applied)
        return
    _show(applied)


def _show(applied: AppliedManifestOut) -> None:
    if applied.manifest_hash is None:
        out.print("No manifest applied yet.")
    else:
        files = ", ".join(f.name for f in applied.files)
        when = iso(applied.applied_at) if applied.applied_at else "?"
        out.print(
            f"manifest {applied.manifest_hash[:12]} applied {when} ({applied.origin}): {files}",
            highlight=False,
        )
    if applied.watching:
        out.print(f"kept applied by the agent from {applied.watching}", highlight=False)
    if applied.applying_hash:
        why = f": {applied.failure}" if applied.failure else " (the agent stopped meanwhile)"
        out.print(
            f"[yellow]apply of {applied.applying_hash[:12]} did not finish{escape(why)}[/]",
            highlight=False,
        )
    for kind in ("network", "vm", "quota", "snapshot_policy", "schedule"):
        names = [o.name for o in applied.objects if o.kind == kind]
        if names:
            out.print(f"  {kind.replace('_', ' ')}: {', '.join(names)}", highlight=False)
