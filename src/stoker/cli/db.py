"""``stoker db ...``: check, back up and restore the agent's database.

These work on the data dir's files directly, not through the agent (a damaged database is
exactly when the agent will not start): ``check`` and ``backup`` are safe while the agent
runs (SQLite's online backup), ``restore`` refuses unless the agent is stopped (it holds
the data dir's lock while it runs).
"""

from __future__ import annotations

from pathlib import Path

import typer

from stoker.cli.common import fail, out

app = typer.Typer(help="Check, back up and restore the agent's database.", no_args_is_help=True)

CONFIG_OPTION = typer.Option(
    None, "-c", "--config", envvar="STOKER_CONFIG", help="The agent's TOML config file."
)
DATA_DIR_OPTION = typer.Option(None, "--data-dir", help="The agent's data_dir (overrides config).")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="db")


def _config(config: Path | None, data_dir: Path | None) -> tuple[Path, Path, int]:
    """(data dir, database path, backups to keep) from the agent's own config."""
    from stoker.config import ConfigError, load_config, section
    from stoker.services.backups import DatabaseConfig

    overrides = {"data_dir": str(data_dir)} if data_dir is not None else {}
    try:
        cfg = load_config(config, overrides=overrides)
        keep = section(cfg, "database", DatabaseConfig).backup_keep
    except ConfigError as exc:
        raise fail(str(exc)) from None
    return cfg.data_dir, cfg.db_path, keep


@app.command("check")
def check(config: Path | None = CONFIG_OPTION, data_dir: Path | None = DATA_DIR_OPTION) -> None:
    """Run SQLite's quick_check on the database (safe while the agent runs).

    Example: stoker db check
    """
    from stoker.store import backup

    root, db_path, _ = _config(config, data_dir)
    found = backup.inspect(db_path)
    latest = backup.latest_backup(root)
    newest = f"latest backup: {latest}" if latest else "no backup yet (`stoker db backup`)"
    if found.state == "ok":
        out.print(f"ok: {db_path} ({found.vms} VMs); {newest}", highlight=False, soft_wrap=True)
        return
    what = found.problem or found.state
    raise fail(f"{db_path} is {found.state}: {what}; {newest}")


@app.command("backup")
def backup_now(
    config: Path | None = CONFIG_OPTION, data_dir: Path | None = DATA_DIR_OPTION
) -> None:
    """Take a backup now into <data_dir>/backups/ (safe while the agent runs).

    Example: stoker db backup
    """
    from stoker.store import backup

    root, db_path, keep = _config(config, data_dir)
    found = backup.inspect(db_path)
    if found.state != "ok":
        raise fail(f"{db_path} is {found.state} ({found.problem or 'no records'}): not backed up")
    try:
        path = backup.take_backup(db_path, root, keep)
    except OSError as exc:
        raise fail(f"backup failed: {exc}") from None
    out.print(f"backed up {db_path} to {path}", highlight=False, soft_wrap=True)


@app.command("backups")
def list_backups(
    config: Path | None = CONFIG_OPTION, data_dir: Path | None = DATA_DIR_OPTION
) -> None:
    """List the backups, newest first.

    Example: stoker db backups
    """
    from stoker.store import backup

    root, _, _ = _config(config, data_dir)
    found = backup.backups(root)
    out.print(
        "\n".join(str(p) for p in found) if found else "no backups", highlight=False, soft_wrap=True
    )


@app.command("restore")
def restore(
    source: Path = typer.Argument(..., help="A backup (see `stoker db backups`)."),
    config: Path | None = CONFIG_OPTION,
    data_dir: Path | None = DATA_DIR_OPTION,
) -> None:
    """Replace the database with a backup; only while the agent is stopped.

    The replaced database is kept beside it as stoker.db.replaced-<time>.

    Example: stoker db restore /var/lib/stoker/backups/stoker-20261130-060000-000000.db
    """
    from stoker.host import lockfile
    from stoker.store import backup

    root, db_path, _ = _config(config, data_dir)
    if not root.is_dir():
        raise fail(f"data_dir {root} does not exist")
    try:
        lock = lockfile.acquire(root)
    except lockfile.AlreadyLocked as exc:
        raise fail(f"{exc}; restore only with the agent stopped") from None
    try:
        replaced = backup.restore(source, db_path)
    except backup.DatabaseDamaged as exc:
        raise fail(str(exc)) from None
    except OSError as exc:
        raise fail(f"restore failed: {exc}") from None
    finally:
        lock.release()
    kept = f"; the previous database is kept as {replaced}" if replaced else ""
    out.print(f"restored {db_path} from {source}{kept}", highlight=False, soft_wrap=True)
