"""The issue's examples against a real agent: on an 80-column terminal `stoker snapshot list
demo` shows whole ids, and `stoker snapshot restore <prefix>` finds the snapshot; an
ambiguous prefix lists the candidates; the shell completes names and ids from the agent."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stoker.cli.main import app
from tests.helpers import guest_spec

pytestmark = pytest.mark.integration

runner = CliRunner()


def stoker(agent, *args: str):
    return runner.invoke(app, ["--socket", str(agent.socket), *args], env={"COLUMNS": "80"})


def test_snapshot_ids_are_whole_and_prefixes_work(agent, guest) -> None:
    with agent.client() as api:
        vm = api.create_vm(guest_spec("demo"))
        first = api.create_snapshot("demo")  # of a VM that never ran: its disks (none here)
        second = api.create_snapshot("demo", tags=["second"])

    listed = stoker(agent, "snapshot", "list", "demo")
    assert listed.exit_code == 0, listed.output
    assert first.id in listed.output and second.id in listed.output
    assert max(len(line) for line in listed.output.splitlines()) <= 80

    # the time part of the id, as someone reads it off the table
    prefix = first.id.rsplit("-", 1)[0] + "-" + first.id.rsplit("-", 1)[1][:2]
    shown = stoker(agent, "snapshot", "show", prefix)
    assert shown.exit_code == 0 and first.id in shown.output, shown.output
    restored = stoker(agent, "snapshot", "restore", prefix, "--yes")
    assert restored.exit_code == 0, restored.output
    assert f"restored from {first.id}" in restored.output

    same_day = first.id[:8]
    ambiguous = stoker(agent, "snapshot", "verify", same_day)
    assert ambiguous.exit_code == 1
    assert first.id in ambiguous.output and second.id in ambiguous.output
    assert "type more of the id" in ambiguous.output

    by_vm_prefix = stoker(agent, "vm", "show", vm.id[:6])
    assert by_vm_prefix.exit_code == 0 and vm.id in by_vm_prefix.output

    made = stoker(agent, "schedule", "add", "demo", "start", "0 8 * * 1-5", "--name", "morning")
    assert made.exit_code == 0, made.output
    with agent.client() as api:
        schedule = next(s for s in api.list_schedules() if s.name == "morning")
    disabled = stoker(agent, "schedule", "disable", schedule.id[:6])
    assert disabled.exit_code == 0 and schedule.id in disabled.output, disabled.output


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash for its completion protocol")
def test_shell_completion_asks_the_agent(agent, guest, tmp_path: Path) -> None:
    with agent.client() as api:
        api.create_vm(guest_spec("demo"))
        api.create_vm(guest_spec("dev-box"))
        snap = api.create_snapshot("demo")
    # the installed command: completion keys on its name (_STOKER_COMPLETE)
    script = Path(sys.executable).parent / "stoker"

    def complete(*words: str) -> list[str]:
        line = ["stoker", "--socket", str(agent.socket), *words]
        env = {
            **os.environ,
            "_STOKER_COMPLETE": "complete_bash",
            "COMP_WORDS": " ".join(line),
            "COMP_CWORD": str(len(line) - 1),
        }
        done = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=30)
        # one completion per line (click's own protocol writes "plain,VALUE")
        lines = [w for w in done.stdout.splitlines() if w]
        return [w.removeprefix("plain,") for w in lines]

    assert complete("vm", "start", "de") == ["demo", "dev-box"]
    assert snap.id in complete("snapshot", "restore", snap.id[:6])
    # an agent that is not there completes nothing, and says nothing
    line = ["stoker", "--socket", str(tmp_path / "nobody.sock"), "vm", "start", ""]
    env = {**os.environ, "_STOKER_COMPLETE": "complete_bash", "COMP_WORDS": " ".join(line),
           "COMP_CWORD": str(len(line) - 1)}  # fmt: skip
    silent = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert silent.stdout.strip() == "" and "Traceback" not in silent.stderr
