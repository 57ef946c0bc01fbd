"""Every command has --help with an example."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from stoker.cli.main import app

runner = CliRunner()


def _commands(group, prefix: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        path = (*prefix, name)
        if hasattr(command, "commands"):  # a group (typer ships its own click)
            yield from _commands(command, path)
        else:
            yield path


COMMANDS = sorted(_commands(typer.main.get_command(app)))


def test_there_are_commands():
    assert ("vm", "create") in COMMANDS and ("agent",) in COMMANDS


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_help_has_an_example(path):
    answer = runner.invoke(app, [*path, "--help"])
    assert answer.exit_code == 0, answer.output
    assert "Example" in answer.output, f"`stoker {' '.join(path)} --help` shows no example"
