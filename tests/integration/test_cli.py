"""The CLI against a real agent: what an operator types and sees."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from stoker.cli.main import app
from tests.helpers import free_port, http_get, wait_for

pytestmark = pytest.mark.integration

runner = CliRunner()


def stoker(agent, *args: str):
    return runner.invoke(app, ["--socket", str(agent.socket), *args])


def test_vm_commands_end_to_end(agent, guest):
    port = free_port()
    made = stoker(
        agent, "vm", "create", "cli-vm", "--guest", "--accel", "tcg", "--forward", f"{port}:80",
        "--label", "tier=web", "--boot-timeout", "60",
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    assert "pending" in made.output

    started = stoker(agent, "vm", "start", "cli-vm", "--timeout", "90")
    assert started.exit_code == 0, started.output
    assert "running" in started.output
    assert wait_for(lambda: http_get(f"http://127.0.0.1:{port}/health"), 10)

    listed = stoker(agent, "vm", "list", "--json")
    assert listed.exit_code == 0
    rows = json.loads(listed.output)
    assert [(r["name"], r["state"]) for r in rows] == [("cli-vm", "running")]

    shown = stoker(agent, "vm", "show", "cli-vm")
    assert shown.exit_code == 0 and "guest ready" in shown.output

    console = stoker(agent, "vm", "console", "cli-vm")
    assert "STOKER-GUEST-READY" in console.output

    again = stoker(agent, "vm", "start", "cli-vm")
    assert again.exit_code == 1
    assert "cannot start a VM that is running" in again.output
    assert "allowed actions: stop, restart" in again.output

    stopped = stoker(agent, "vm", "stop", "cli-vm", "--force")
    assert stopped.exit_code == 0 and "stopped" in stopped.output

    gone = stoker(agent, "vm", "delete", "cli-vm")
    assert gone.exit_code == 0
    assert json.loads(stoker(agent, "vm", "list", "--json").output) == []


def test_bad_input_is_a_message_and_exit_1(agent, guest):
    bad = stoker(agent, "vm", "create", "Bad_Name", "--guest")
    assert bad.exit_code == 1
    assert "name" in bad.output and "Traceback" not in bad.output

    absent = agent.images / "vmlinuz"  # in the agent's image pool, but not there
    missing = stoker(agent, "vm", "create", "nokernel", "--kernel", str(absent))
    assert missing.exit_code == 1
    assert f"kernel: '{absent}' does not exist (no such file)" in missing.output

    unknown = stoker(agent, "vm", "show", "nope")
    assert unknown.exit_code == 1 and "no VM named" in unknown.output


def test_spec_file(agent, guest, tmp_path):
    spec = tmp_path / "web.toml"
    spec.write_text(
        f'kernel = "{guest.kernel}"\ninitrd = "{guest.initrd}"\nmemory_mib = 96\n'
        '[labels]\ntier = "web"\n'
    )
    made = stoker(agent, "vm", "create", "from-file", "-f", str(spec), "--json")
    assert made.exit_code == 0, made.output
    vm = json.loads(made.output)
    assert vm["spec"]["memory_mib"] == 96 and vm["spec"]["labels"] == {"tier": "web"}

    broken = tmp_path / "broken.toml"
    broken.write_text("kernel = ")
    answer = stoker(agent, "vm", "create", "broken", "-f", str(broken))
    assert answer.exit_code == 1 and "not valid TOML" in answer.output


def test_unreachable_agent_says_what_to_do(tmp_path):
    answer = runner.invoke(app, ["--socket", str(tmp_path / "nope.sock"), "vm", "list"])
    assert answer.exit_code == 2
    assert "cannot reach the stoker agent" in answer.output
    assert "Traceback" not in answer.output
