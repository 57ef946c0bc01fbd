"""The packaged unit is what `stoker agent --print-systemd-unit` prints, and systemd accepts it."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from stoker.cli.main import app
from stoker.host.sdnotify import Notifier
from stoker.logs import default_format, under_systemd
from tests.helpers import REPO

UNIT_FILE = REPO / "packaging" / "stoker.service"


def test_printed_unit_is_the_packaged_file() -> None:
    printed = CliRunner().invoke(app, ["agent", "--print-systemd-unit"])
    assert printed.exit_code == 0
    assert printed.output == UNIT_FILE.read_text()


def test_unit_keeps_vms_across_restarts_and_is_watched() -> None:
    lines = set(UNIT_FILE.read_text().splitlines())
    for setting in ("Type=notify", "KillMode=process", "Restart=on-failure", "WatchdogSec=30"):
        assert setting in lines


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian package systemd; make sysdeps adds it)",
)
def test_systemd_analyze_verify_accepts_the_unit() -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(UNIT_FILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_notifier_reads_the_environment() -> None:
    assert not Notifier({}).enabled
    assert Notifier({"NOTIFY_SOCKET": "@abstract"}).address == "\0abstract"
    assert Notifier({"NOTIFY_SOCKET": "relative"}).address is None
    watched = Notifier({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "30000000"})
    assert watched.watchdog_s == 30.0
    # meant for another process
    other = Notifier({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1"})
    assert other.watchdog_s is None
    assert not Notifier({}).send("READY=1")  # outside systemd: nothing, no error


def test_logs_default_to_json_under_systemd() -> None:
    assert under_systemd({"INVOCATION_ID": "abc"}) and under_systemd({"JOURNAL_STREAM": "8:9"})
    assert not under_systemd({})
    assert default_format({"INVOCATION_ID": "abc"}) == "json"
    assert default_format({}) == "text"
