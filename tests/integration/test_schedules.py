"""Schedules end to end: a real agent whose cron fires stop and then start a real guest.

The agent process keeps the real clock, so the schedules use ``* * * * *`` and the test waits
for the next minute boundary (at most ~60 s each, plus the action)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from stoker.cli.main import app
from stoker.wire import RunOut
from tests.helpers import free_port, guest_spec, http_get, wait_for

pytestmark = pytest.mark.integration


def cli(agent, *args: str):
    result = CliRunner().invoke(app, ["--socket", str(agent.socket), *args], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def fired_at_minute(run: RunOut) -> bool:
    fire = run.fire_at
    return fire.second == 0 and fire.microsecond == 0


def test_cron_fires_stop_a_running_vm_and_another_starts_it_again(agent):
    port = free_port()
    with agent.client() as api:
        api.create_vm(guest_spec("sched-vm", port))
        assert api.start_vm("sched-vm", wait=True, timeout_s=90).state == "running"

        # the seed's command form, through the CLI
        output = cli(agent, "schedule", "add", "sched-vm", "stop", "* * * * *", "--name", "stopper")
        assert "stop sched-vm at '* * * * *'" in output and "next run" in output
        stopper = api.get_schedule("stopper")
        assert stopper.next_fire_at is not None

        vm = wait_for(lambda: (v := api.get_vm("sched-vm")).state == "stopped" and v, timeout=100)
        assert vm.state_reason == "guest shut down gracefully"
        assert any("schedule stopper" in t.reason for t in vm.transitions)
        api.disable_schedule("stopper")
        run = wait_for(
            lambda: [r for r in api.schedule_runs("stopper") if r.status != "running"], 30
        )[-1]
        assert run.status == "succeeded" and run.trigger == "cron", run
        assert fired_at_minute(run)
        assert run.results[0]["vm"] == "sched-vm"

        # another schedule starts it again
        api.create_schedule("start", "* * * * *", vm="sched-vm", name="starter")
        vm = wait_for(lambda: (v := api.get_vm("sched-vm")).state == "running" and v, timeout=150)
        assert wait_for(lambda: http_get(f"http://127.0.0.1:{port}/health"), 15) == (200, "ok\n")
        api.disable_schedule("starter")
        run = wait_for(
            lambda: [r for r in api.schedule_runs("starter") if r.status != "running"], 60
        )[-1]
        assert run.status == "succeeded" and run.trigger == "cron", run
        assert fired_at_minute(run)

        # run-now, and the history and list as an operator sees them
        manual = api.run_schedule("stopper", wait=True)
        assert manual.status == "succeeded" and manual.trigger == "manual", manual
        assert api.get_vm("sched-vm").state == "stopped"
        history = cli(agent, "schedule", "history", "stopper")
        assert "manual" in history and "cron" in history and "succeeded" in history
        listing = cli(agent, "schedule", "list")
        assert "stopper" in listing and "starter" in listing and "daily-report" in listing
        assert "disabled" in listing

        assert len(api.events(type="schedule.ran", limit=500)) >= 3

        # a report of today so far names the VM and the schedule runs
        report = api.generate_report("daily")
        assert "VM sched-vm" in report.text
        path = Path(agent.data_dir) / "reports" / f"{report.label}.txt"
        assert path.read_text() == report.text
        assert (path.with_suffix(".json")).is_file()
        web = next(v for v in report.report["vms"] if v["name"] == "sched-vm")
        assert web["schedule_runs"].get("succeeded", 0) >= 3
        assert 0 < web["uptime_percent"] <= 100
        assert "daily-" in cli(agent, "report", "list")


def test_schedule_errors_are_problems_not_500s(agent):
    with agent.client() as api:
        from stoker.client import StokerError

        with pytest.raises(StokerError) as caught:
            api.create_schedule("start", "0 8 * *", vm="nope")
        assert caught.value.status == 422 and "cron" in caught.value.detail
        with pytest.raises(StokerError) as caught:
            api.create_schedule("start", "0 8 * * 1-5", vm="nope")
        assert caught.value.status == 422 and "no VM named" in caught.value.detail
        with pytest.raises(StokerError) as caught:
            api.get_schedule("missing")
        assert caught.value.status == 404
        with pytest.raises(StokerError) as caught:
            api.generate_report("hourly")
        assert caught.value.status == 422
    result = CliRunner().invoke(
        app, ["--socket", str(agent.socket), "schedule", "add", "web", "launch", "@daily"]
    )
    assert result.exit_code == 1 and "unknown action" in result.output
