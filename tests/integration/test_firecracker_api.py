"""``hypervisor = "firecracker"`` through the real API and CLI on a host that cannot run it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stoker.cli.main import app
from stoker.client import StokerError
from tests.helpers import AgentProcess, guest_spec

pytestmark = pytest.mark.integration


def firecracker_the_agent_would_find() -> str | None:
    """The binary an agent started from this environment would run (the driver's rule): what
    ``STOKER_FIRECRACKER_BIN`` names (a path, or a name looked up on PATH), else
    ``firecracker`` on PATH."""
    named = os.environ.get("STOKER_FIRECRACKER_BIN") or "firecracker"
    if "/" in named:
        return named if Path(named).is_file() and os.access(named, os.X_OK) else None
    return shutil.which(named)


@pytest.mark.skipif(
    firecracker_the_agent_would_find() is not None,
    reason=(
        f"a Firecracker binary is reachable ({firecracker_the_agent_would_find()}, from "
        "STOKER_FIRECRACKER_BIN or PATH): the agent would accept the VM, so there is no "
        "'binary not found' error to check"
    ),
)
def test_firecracker_without_binary_is_a_clear_422(agent: AgentProcess) -> None:
    spec = guest_spec("fc-vm", hypervisor="firecracker", accel="auto")
    with agent.client() as api, pytest.raises(StokerError) as info:
        api.create_vm(spec)
    assert info.value.status == 422
    assert "firecracker binary not found" in info.value.detail
    assert "STOKER_FIRECRACKER_BIN" in info.value.detail
    assert not any((agent.data_dir / "vms").iterdir())

    answer = CliRunner().invoke(
        app,
        [
            "--socket",
            str(agent.socket),
            "vm",
            "create",
            "fc-cli",
            "--guest",
            "--hypervisor",
            "firecracker",
        ],
    )
    assert answer.exit_code == 1
    assert "firecracker binary not found" in answer.output
