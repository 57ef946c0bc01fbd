"""``stoker``: the root command."""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer

from stoker import __version__
from stoker.cli import cluster as cluster_cli
from stoker.cli import (
    db,
    doctor,
    events,
    manifest,
    network,
    quota,
    resources,
    schedule,
    snapshot,
    ui,
    vm,
)
from stoker.cli import node as node_cli
from stoker.cli.common import fail, out

app = typer.Typer(
    help="stoker keeps microVMs alive on this host. Talks to the agent over its Unix socket.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
app.add_typer(vm.app, name="vm")
for module in (events, resources, quota, snapshot, schedule, network, manifest, db, doctor, ui):
    module.register(app)

cluster_cli.register(app)  # cluster mode (docs/cluster.md)
node_cli.register(app)

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
    token_file: Path | None = typer.Option(
        None,
        "--token-file",
        envvar="STOKER_TOKEN_FILE",
        help="File holding the bearer token for --url (or set STOKER_TOKEN). There is no "
        "--token: a secret on the command line is visible to every user in `ps`.",
    ),
) -> None:
    ctx.obj = {"socket": socket, "url": url, "token_file": token_file}


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
    log_format: str | None = typer.Option(
        None, help="text or json (default: json under systemd, else text)."
    ),
    print_systemd_unit: bool = typer.Option(
        False, "--print-systemd-unit", help="Print the systemd unit for the agent and exit."
    ),
    manifest_path: Path | None = typer.Option(
        None,
        "--manifest",
        help="A manifest file or directory to apply at start and whenever it changes "
        "([manifest] in the config sets prune and restart).",
    ),
    cluster_urls: str | None = typer.Option(
        None,
        "--cluster",
        help="Join a cluster: etcd client URLs, http://HOST:PORT[,...] ([cluster] in the "
        "config sets the node name, labels and more).",
    ),
) -> None:
    """Run the agent in the foreground.

    Example: stoker agent --config /etc/stoker/agent.toml
    """
    if print_systemd_unit:
        from stoker.systemd_unit import UNIT

        typer.echo(UNIT, nl=False)
        return
    from stoker import logs
    from stoker.agent import Agent
    from stoker.api.serve import ServeError
    from stoker.config import ConfigError, load_config
    from stoker.startup import StartRefused

    overrides: dict[str, object] = {}
    if data_dir is not None:
        overrides["data_dir"] = str(data_dir)
    if log_format is not None:
        overrides["log"] = {"format": log_format}
    if manifest_path is not None:
        overrides["manifest"] = {"path": str(manifest_path.absolute())}
    if cluster_urls is not None:  # cluster mode: etcd's client URLs (docs/cluster.md)
        overrides["cluster"] = {"endpoints": cluster_urls}
    try:  # options go through the same validation as the file (the data dir's length...)
        cfg = load_config(config, overrides=overrides)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    fmt = cfg.log.format if "format" in cfg.log.model_fields_set else logs.default_format()
    logs.setup(cfg.log.level, fmt)
    try:
        asyncio.run(Agent(cfg).run())
    except (ConfigError, StartRefused, ServeError) as exc:
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
    from stoker.cli.common import err
    from stoker.cli.progress import working
    from stoker.guest.build import build_guest

    with working("building the test guest") as step:

        def log(message: str) -> None:  # each step stays on stderr; the spinner shows it
            err.print(message, highlight=False)
            step(message)

        try:
            image = build_guest(out_dir, force=force, log=log)
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
