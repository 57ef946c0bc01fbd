"""``stoker doctor``: checks this host for what stoker needs and says what to fix.

It runs here, not through the agent: it is what to run when the agent will not start.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape

from stoker.cli.common import fail, out

LEVEL_STYLE = {"ok": "green", "warn": "yellow", "fail": "red"}


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root ``stoker`` command."""
    app.command("doctor")(doctor)


def doctor(
    config: Path | None = typer.Option(
        None, "-c", "--config", envvar="STOKER_CONFIG", help="The agent's TOML config file."
    ),
    data_dir: Path | None = typer.Option(None, help="Check this data_dir instead."),
    as_json: bool = typer.Option(False, "--json", help="Print the findings as JSON."),
) -> None:
    """Check the host: QEMU, KVM, cgroups, tc, nftables, dnsmasq, confinement, the data dir
    and its free space, clock sync. One line each; exit 1 when something required is missing.

    Example: stoker doctor --config /etc/stoker/agent.toml
    """
    from stoker.config import ConfigError, load_config
    from stoker.domain.doctor import examine, exit_code
    from stoker.host.hostcheck import gather

    overrides = {"data_dir": str(data_dir)} if data_dir is not None else {}
    try:
        cfg = load_config(config, overrides=overrides)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    facts = gather(
        cfg.data_dir,
        qemu_binary=cfg.qemu.binary,
        confine=cfg.security.confine,
        confine_mode=cfg.security.mode,
    )
    findings = examine(facts)
    code = exit_code(findings)
    if as_json:
        body = {
            "ok": code == 0,
            "findings": [
                {"check": f.check, "level": f.level.value, "message": f.message, "fix": f.fix}
                for f in findings
            ],
        }
        typer.echo(json.dumps(body, indent=2))
    else:
        width = max(len(f.check) for f in findings)
        for f in findings:
            style = LEVEL_STYLE[f.level.value]
            line = (
                f"[{style}]{f.level.value:<4}[/]  {escape(f.check):<{width}}  {escape(f.message)}"
            )
            if f.fix:
                line += f" [dim]->[/] {escape(f.fix)}"
            out.print(line, highlight=False, soft_wrap=True)
    raise typer.Exit(code)
