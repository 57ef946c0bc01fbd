"""``hypervisor = "firecracker"`` through the real API and CLI on a host that cannot run it."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from stoker.cli.main import app
from stoker.client import StokerError
from tests.helpers import guest_spec

pytestmark = pytest.mark.integration


@pytest.mark.skipif(
    bool(os.environ.get("STOKER_FIRECRACKER_BIN")),
    reason="STOKER_FIRECRACKER_BIN is set: this host may run Firecracker, so no error is expected",
)
def test_firecracker_without_binary_is_a_clear_422(agent):
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
