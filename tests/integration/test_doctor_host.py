"""``stoker doctor`` on this very host: real probes, one line per check, the exit code."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import short_tmpdir

pytestmark = pytest.mark.integration


def _doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stoker.cli.main", "doctor", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_doctor_reports_this_host() -> None:
    data_dir = short_tmpdir("stk-doc-")
    try:
        done = _doctor("--data-dir", str(data_dir), "--json")
        body = json.loads(done.stdout)
        checks = {f["check"]: f for f in body["findings"]}
        for name in ("qemu", "kvm", "cgroups", "tc", "nft", "dnsmasq", "data dir", "clock"):
            assert name in checks, body
        assert "QEMU emulator version" in checks["qemu"]["message"]
        # KVM cannot run guests on these machines: a warning with the reason, not a failure
        assert checks["kvm"]["level"] in ("ok", "warn")
        assert done.returncode == (0 if body["ok"] else 1)
        text = _doctor("--data-dir", str(data_dir))
        assert len(text.stdout.strip().splitlines()) == len(body["findings"])
    finally:
        data_dir.rmdir()


def test_doctor_fails_when_the_data_dir_is_unusable(tmp_path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    done = _doctor("--data-dir", str(not_a_dir))
    assert done.returncode == 1
    assert "is not a directory" in done.stdout
