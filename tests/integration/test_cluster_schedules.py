"""Cluster schedules end to end: a real 3-member etcd, three real agents in namespaces
(``tests/cluster_world.py``), one real guest.

A ``stop`` schedule on a label selector and a ``start`` schedule on the VM's name fire at two
consecutive minute boundaries (the test waits for at most two real boundaries, about 75 s +
60 s at worst): the active scheduler runs each once, the VM's node stops and then starts its
local copy, and ``stoker cluster schedule list`` shows the last results. A second guest gets a
``restart`` at the first boundary: its node restarts its copy once (a new QEMU process), and
not again at the second.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from typer.testing import CliRunner

from stoker.cli.main import app as cli
from stoker.client import StokerError
from stoker.wire.cluster import ClusterScheduleOut
from tests.cluster_world import World, cluster_world
from tests.etcd_cluster import MISSING, etcd_available
from tests.helpers import free_port, guest_spec, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not etcd_available(), reason=MISSING),
]

runner = CliRunner()
VM = "sch-web"
OTHER = "sch-app"


def stoker(world: World, node: str, *args: str) -> str:
    socket = str(world.nodes[node].agent.socket)
    result = runner.invoke(cli, ["--socket", socket, *args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with cluster_world(4) as built:
        yield built
        assert not built.monitor.violations, built.monitor.violations


def next_minutes(margin_s: float = 12) -> tuple[datetime, datetime]:
    """The next two minute boundaries, the first at least ``margin_s`` away (time to create
    the schedules and boot the guest before it)."""
    now = datetime.now(UTC)
    first = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    if (first - now).total_seconds() < margin_s:
        first += timedelta(minutes=1)
    return first, first + timedelta(minutes=1)


def local_state(world: World, node: str, name: str = VM) -> str | None:
    vms = {vm.name: vm.state for vm in world.nodes[node].api().list_vms()}
    return vms.get(name)


def local_pid(world: World, node: str, name: str) -> int | None:
    for vm in world.nodes[node].api().list_vms():
        if vm.name == name and vm.state == "running" and vm.process is not None:
            return vm.process.pid
    return None


def ran(world: World, name: str, fire: datetime) -> ClusterScheduleOut | None:
    schedule = world.api("n2").cluster_schedule(name)
    run = schedule.last_run
    return schedule if run is not None and run.fire_at == fire else None


def test_stop_then_start_at_consecutive_minutes_and_a_restart(world: World) -> None:
    api = world.api("n1")
    spec = guest_spec(VM, free_port(), labels={"tier": "sched"})
    vm = api.create_cluster_vm(spec, wait_s=20)
    assert vm.node is not None
    node = vm.node
    other = api.create_cluster_vm(guest_spec(OTHER, free_port()), wait_s=20)
    assert other.node is not None
    other_node = other.node
    stop_at, start_at = next_minutes()
    stoker(
        world, "n1", "cluster", "schedule", "create", "sch-stop",
        "--cron", f"{stop_at.minute} * * * *", "--action", "stop",
        "--selector", "tier=sched", "--timezone", "UTC",
    )  # fmt: skip
    api.create_cluster_schedule("sch-start", f"{start_at.minute} * * * *", "start", vm=VM, tz="UTC")
    api.create_cluster_schedule(
        "sch-restart", f"{stop_at.minute} * * * *", "restart", vm=OTHER, tz="UTC"
    )
    with pytest.raises(StokerError) as again:  # created once per name
        world.api("n3").create_cluster_schedule(
            "sch-stop", "@daily", "stop", selector={"tier": "x"}
        )
    assert again.value.status == 409
    listed = {s.name: s for s in world.api("n3").cluster_schedules()}
    assert listed["sch-stop"].next_fire_at == stop_at
    assert listed["sch-start"].next_fire_at == start_at
    assert listed["sch-stop"].last_run is None

    wait_for(lambda: api.get_cluster_vm(VM).state == "running", 60, 0.2)
    first_pid = wait_for(lambda: local_pid(world, other_node, OTHER), 60, 0.2)
    assert datetime.now(UTC) < stop_at, "the guests booted too late for the first boundary"

    # the stop fires at its minute: desired stopped, and the local copy on its node stopped
    timeout = (stop_at - datetime.now(UTC)).total_seconds() + 20
    stopped = wait_for(lambda: ran(world, "sch-stop", stop_at), timeout, 0.2)
    assert stopped.last_run is not None
    latency = (stopped.last_run.at - stop_at).total_seconds()
    assert stopped.last_run.outcome == "ok", stopped.last_run
    assert stopped.last_run.changed == [VM]
    leader = api.cluster().leader
    assert stopped.last_run.node == leader
    assert api.get_cluster_vm(VM).desired == "stopped"
    wait_for(lambda: local_state(world, node) == "stopped", 20, 0.2)
    wait_for(lambda: api.get_cluster_vm(VM).state == "stopped", 10, 0.2)
    assert leader is not None
    events = world.api(leader).events(type="schedule.ran")
    assert any(e.data.get("schedule") == "sch-stop" for e in events), events
    restarted = wait_for(lambda: ran(world, "sch-restart", stop_at), 10, 0.2)
    assert restarted.last_run is not None and restarted.last_run.changed == [OTHER]
    assert api.get_cluster_vm(OTHER).desired == "running"

    def restarted_pid() -> int | None:
        pid = local_pid(world, other_node, OTHER)
        return pid if pid != first_pid else None

    second_pid = wait_for(restarted_pid, 60, 0.2)
    listing = stoker(world, "n2", "cluster", "schedule", "list")
    assert "sch-stop" in listing and "ok" in listing

    # the start fires at the next minute and brings it back, once
    timeout = (start_at - datetime.now(UTC)).total_seconds() + 20
    started = wait_for(lambda: ran(world, "sch-start", start_at), timeout, 0.2)
    assert started.last_run is not None
    assert started.last_run.outcome == "ok" and started.last_run.changed == [VM]
    wait_for(lambda: local_state(world, node) == "running", 60, 0.2)
    wait_for(lambda: api.get_cluster_vm(VM).state == "running", 10, 0.2)
    # the stop schedule did not run again (its next fire is an hour later)
    assert world.api("n3").cluster_schedule("sch-stop").last_run == stopped.last_run
    assert latency < 5, f"the stop ran {latency:.1f} s after its minute"
    shown = stoker(world, "n3", "cluster", "schedule", "show", "sch-start")
    assert "started sch-web" in shown
    assert local_pid(world, other_node, OTHER) == second_pid  # restarted once, not again

    stoker(world, "n1", "cluster", "schedule", "delete", "sch-stop")
    api.delete_cluster_schedule("sch-start")
    api.delete_cluster_schedule("sch-restart")
    assert api.cluster_schedules() == []
    api.delete_cluster_vm(VM)
    api.delete_cluster_vm(OTHER)
    wait_for(lambda: local_state(world, node) is None, 30, 0.2)
    wait_for(lambda: local_state(world, other_node, OTHER) is None, 30, 0.2)
