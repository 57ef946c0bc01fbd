"""``stoker``: the root command."""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer

from stoker import __version__
from stoker.cli import events, quota, resources, schedule, snapshot, vm
from stoker.cli.common import fail, out

app = typer.Typer(
    help="stoker keeps microVMs alive on this host. Talks to the agent over its Unix socket.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
app.add_typer(vm.app, name="vm")
for module in (events, resources, quota, snapshot, schedule):
    module.register(app)

guest_app = typer.Typer(
    help="The small test guest used by the demo and the tests.", no_args_is_help=True
)
app.add_typer(guest_app, name="guest")


@app.callback()
def main(
    ctx: typer.Context,
    socket: Path | None = typer.Option(None, envvar="STOKER_SOCKET", help="Agent Unix socket."),
    url: str | None = typer.Option(
        None, envvar="STOKER_URL", help="Agent URL (TCP), e.g. http://127.0.0.1:8080."
    ),
    token: str | None = typer.Option(None, envvar="STOKER_TOKEN", help="Bearer token for --url."),
) -> None:
    ctx.obj = {"socket": socket, "url": url, "token": token}


@app.command()
def version() -> None:
    """Print stoker's version.

    Example: stoker version
    """
    out.print(__version__)


@app.command()
def agent(
    config: Path | None = typer.Option(
        None, "-c", "--config", envvar="STOKER_CONFIG", help="TOML config file."
    ),
    data_dir: Path | None = typer.Option(None, help="Override data_dir."),
    log_format: str | None = typer.Option(None, help="text or json."),
) -> None:
    """Run the agent in the foreground.

    Example: stoker agent --config /etc/stoker/agent.toml
    """
    from stoker import logs
    from stoker.agent import Agent
    from stoker.config import ConfigError, load_config

    try:
        cfg = load_config(config)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    if data_dir is not None:
        cfg.data_dir = data_dir
    if log_format is not None:
        if log_format not in ("text", "json"):
            raise fail("--log-format must be text or json")
        cfg.log.format = log_format  # type: ignore[assignment]
    logs.setup(cfg.log.level, cfg.log.format)
    try:
        asyncio.run(Agent(cfg).run())
    except ConfigError as exc:  # a capability's own section, validated as it is installed
        raise fail(str(exc)) from None
    except OSError as exc:
        raise fail(f"the agent could not start: {exc}") from None


@guest_app.command("build")
def guest_build(
    out_dir: Path | None = typer.Option(
        None, "--out", help="Cache directory (default: ~/.cache/stoker/guest)."
    ),
    force: bool = typer.Option(False, "--force", help="Rebuild even if cached."),
) -> None:
    """Build the test guest: Debian cloud kernel plus a busybox initramfs.

    Example: stoker guest build
    """
    from stoker.guest.build import build_guest

    try:
        image = build_guest(out_dir, force=force, log=lambda m: out.print(m, highlight=False))
    except Exception as exc:
        raise fail(f"building the guest failed: {exc}") from None
    out.print(f"kernel  {image.kernel}\ninitrd  {image.initrd}\ncmdline {image.cmdline}")


@guest_app.command("path")
def guest_path() -> None:
    """Print where the test guest is (exit 1 if not built).

    Example: stoker guest path
    """
    from stoker.guest.build import find_guest

    image = find_guest()
    if image is None:
        raise fail("the test guest is not built: run `stoker guest build`")
    out.print(f"kernel  {image.kernel}\ninitrd  {image.initrd}\ncmdline {image.cmdline}")


if __name__ == "__main__":
    app()
