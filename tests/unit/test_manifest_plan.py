"""The pure plan: create / update in place / update with restart / pending / delete, drift,
order, rendering; and the property that applying a plan leaves nothing more to do."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from stoker.domain.quota import Quota
from stoker.domain.spec import VMSpec
from stoker.domain.states import VMState
from stoker.manifest import (
    MANAGER,
    VM_FIELDS,
    DesiredSchedule,
    DesiredVM,
    HostState,
    Kind,
    Manifest,
    NetworkRecord,
    NetworkSpec,
    Op,
    Plan,
    ScheduleState,
    SnapshotPolicySpec,
    VMRecord,
    build_manifest,
    parse_sources,
    plan,
)
from stoker.services.scheduler.spec import ScheduleSpec

BASE = """
[defaults]
quota = { cpu_percent = 100, memory_mib = 1024 }
snapshot_policy = { retention = "daily:7,weekly:4", interval = "1d" }

[[network]]
name = "lan"
subnet = "10.20.0.0/24"

[[vm]]
name = "web"
kernel = "/boot/vmlinuz"
memory_mib = 256
labels = { tier = "web" }
network_name = "lan"
running = true

[[vm.schedules]]
action = "stop"
cron = "0 18 * * *"

[[vm]]
name = "db"
kernel = "/boot/vmlinuz"
memory_mib = 512

[[schedule]]
name = "nightly"
action = "snapshot"
selector = { tier = "web" }
cron = "30 2 * * *"
"""


def manifest(text: str = BASE) -> Manifest:
    return build_manifest(parse_sources([("host.toml", text.encode())]))


def edited(*pairs: tuple[str, str]) -> Manifest:
    """BASE with each (old, new) text replaced."""
    text = BASE
    for old, new in pairs:
        assert old in text, old
        text = text.replace(old, new)
    return manifest(text)


def applied(m: Manifest, state: VMState = VMState.RUNNING) -> HostState:
    """The host right after applying ``m`` to an empty host, every VM in ``state``."""
    after = plan(m, HostState()).state_after()
    return replace(after, vms=tuple(replace(vm, state=state) for vm in after.vms))


def ops(p: Plan) -> list[tuple[str, str, str]]:
    return [(str(s.kind), str(s.op), s.name) for s in p.steps]


def vm_of(state: HostState, name: str) -> VMRecord:
    return next(vm for vm in state.vms if vm.name == name)


def with_vm(host: HostState, name: str, **changes: Any) -> HostState:
    vms = tuple(replace(vm, **changes) if vm.name == name else vm for vm in host.vms)
    return replace(host, vms=vms)


def hand_made(name: str, state: VMState = VMState.RUNNING) -> VMRecord:
    return VMRecord(VMSpec(name=name, kernel="/boot/vmlinuz"), state)


# --------------------------------------------------------------------------- the cases


def test_empty_host_creates_everything_in_dependency_order() -> None:
    p = plan(manifest(), HostState())
    assert ops(p) == [
        ("network", "create", "lan"),
        ("vm", "create", "db"),
        ("vm", "create", "web"),
        ("quota", "create", "db"),
        ("quota", "create", "web"),
        ("snapshot_policy", "create", "db"),
        ("snapshot_policy", "create", "web"),
        ("schedule", "create", "nightly"),
        ("schedule", "create", "web-stop"),
        ("vm", "start", "web"),
    ]
    assert p.exit_code() == 2 and p.changed


def test_identical_host_is_a_no_op() -> None:
    m = manifest()
    p = plan(m, applied(m))
    assert p.steps == () and p.drift == () and p.exit_code() == 0
    assert p.render().startswith("No changes")


def test_quota_change_is_an_update_in_place() -> None:
    m = manifest()
    p = plan(edited(("cpu_percent = 100", "cpu_percent = 200")), applied(m))
    assert ops(p) == [("quota", "update", "db"), ("quota", "update", "web")]
    change = p.steps[0].changes[0]
    assert (change.field, change.old, change.new, change.restart) == (
        "cpu_percent",
        100,
        200,
        False,
    )
    assert "cpu_percent: 100 -> 200" in p.render()


def test_memory_change_of_a_running_vm_needs_restart_else_is_pending() -> None:
    m = manifest()
    host = applied(m)
    bigger = edited(("memory_mib = 256", "memory_mib = 384"))
    pending = plan(bigger, host)
    assert ops(pending) == [("vm", "pending-restart", "web")]
    assert pending.steps[0].changes[0].restart and "memory_mib" in pending.steps[0].note
    assert pending.exit_code() == 2 and "[restart]" in pending.render()
    # nothing of it reached the VM; the plan keeps saying so
    assert vm_of(pending.state_after(), "web").spec.memory_mib == 256
    assert ops(plan(bigger, pending.state_after())) == ops(pending)

    restarted = plan(bigger, host, restart=True)
    assert ops(restarted) == [("vm", "update-restart", "web"), ("vm", "start", "web")]
    assert "-/+ vm web  (restart for memory_mib)" in restarted.render()
    assert plan(bigger, restarted.state_after(), restart=True).steps == ()


def test_pending_restart_still_applies_the_live_part() -> None:
    host = applied(manifest())
    changed = edited(
        ("memory_mib = 256", "memory_mib = 384"), ('tier = "web" }\nnet', 'tier = "www" }\nnet')
    )
    p = plan(changed, host)
    assert ops(p) == [("vm", "pending-restart", "web")]
    after = vm_of(p.state_after(), "web")
    assert after.spec.labels == {"tier": "www"} and after.spec.memory_mib == 256
    again = plan(changed, p.state_after())
    assert [c.field for c in again.steps[0].changes] == ["memory_mib"]


def test_stopped_vm_takes_even_memory_in_place() -> None:
    m = manifest()
    host = with_vm(applied(m), "db", state=VMState.STOPPED)
    p = plan(edited(("memory_mib = 512", "memory_mib = 768")), host)
    assert ops(p) == [("vm", "update", "db")]
    assert "next start" in p.steps[0].note


def test_removed_vm_is_deleted_only_with_prune_and_only_if_managed() -> None:
    m = manifest()
    host = applied(m)
    host = replace(host, vms=(*host.vms, hand_made("by-hand")))
    without_db = edited(('[[vm]]\nname = "db"\nkernel = "/boot/vmlinuz"\nmemory_mib = 512\n', ""))
    kept = plan(without_db, host)
    assert kept.steps == () and kept.exit_code() == 0
    assert kept.kept == ((Kind.VM, "db"),) and "apply --prune deletes" in kept.render()
    pruned = plan(without_db, host, prune=True)
    assert ops(pruned) == [("vm", "delete", "db")]
    assert "stopped (forced) first" in pruned.steps[0].note
    names = {vm.name for vm in pruned.state_after().vms}
    assert names == {"web", "by-hand"}  # the VM made by hand survives prune


def test_prune_deletes_schedules_first_and_networks_last() -> None:
    m = manifest()
    host = applied(m, VMState.STOPPED)
    bare = manifest("")
    p = plan(bare, host, prune=True)
    kinds = ops(p)
    assert kinds[0][:2] == ("schedule", "delete") and kinds[-1] == ("network", "delete", "lan")
    assert kinds.index(("vm", "delete", "db")) < kinds.index(("network", "delete", "lan"))
    assert plan(bare, p.state_after(), prune=True).steps == ()


def test_hand_made_vm_of_the_same_name_is_adopted() -> None:
    m = manifest()
    host = applied(m)
    host = with_vm(host, "db", managed_by=None)
    p = plan(m, host)
    assert ops(p) == [("vm", "update", "db")]
    assert p.steps[0].adopt and p.steps[0].changes == () and "by hand" in p.steps[0].note
    assert vm_of(p.state_after(), "db").managed_by == MANAGER


def test_running_flag_starts_and_stops() -> None:
    m = manifest()
    stopped = applied(m, VMState.STOPPED)
    assert ops(plan(m, stopped)) == [("vm", "start", "web")]
    errored = applied(m, VMState.ERROR)
    assert plan(m, errored).steps == ()  # recovery's business, not apply's
    off = edited(("running = true", "running = false"))
    p = plan(off, applied(m), restart=False)
    assert ops(p) == [("vm", "stop", "web")]
    # a stop is not a restart: memory changes in the same apply go in place
    p = plan(
        edited(("running = true", "running = false"), ("memory_mib = 256", "memory_mib = 300")),
        applied(m),
    )
    assert ops(p) == [("vm", "stop", "web"), ("vm", "update", "web")]


def test_drift_reports_hand_changes_since_the_last_apply() -> None:
    m = manifest()
    first = plan(m, HostState())
    record = first.record()
    host = first.state_after()
    assert plan(m, host, last_applied=record).drift == ()
    host = with_vm(host, "db", quota=Quota(cpu_percent=300, memory_mib=1024))
    host = replace(host, schedules=tuple(s for s in host.schedules if s.name != "nightly"))
    p = plan(m, host, last_applied=record)
    drift = {(str(d.kind), d.name, d.field): d for d in p.drift}
    d = drift[("vm", "db", "quota.cpu_percent")]
    assert (d.applied, d.now) == (100, 300)
    assert ("schedule", "nightly", None) in drift
    assert ops(p) == [("quota", "update", "db"), ("schedule", "create", "nightly")]
    text = p.render()
    assert "vm db: quota.cpu_percent: 100 -> 300" in text and "schedule nightly: deleted" in text


def test_pending_restart_is_not_drift() -> None:
    m = manifest()
    bigger = edited(("memory_mib = 256", "memory_mib = 384"))
    p = plan(bigger, applied(m))
    assert plan(bigger, p.state_after(), last_applied=p.record()).drift == ()


def test_schedules_compare_with_the_scheduler_defaults_filled_in() -> None:
    m = manifest()
    host = replace(applied(m), schedule_tz="Europe/Berlin", schedule_grace_s=60.0)
    p = plan(m, host)
    assert {str(c.field) for s in p.steps for c in s.changes} == {"tz", "grace_s"}
    stored = plan(m, replace(HostState(), schedule_tz="Europe/Berlin")).state_after()
    assert {s.tz for s in stored.schedules} == {"Europe/Berlin"}


def test_network_subnet_change_replaces_isolation_updates() -> None:
    m = manifest()
    host = applied(m)
    p = plan(edited(("10.20.0.0/24", "10.30.0.0/24")), host)
    assert ops(p) == [("network", "replace", "lan")]
    isolated = BASE.replace(
        'subnet = "10.20.0.0/24"', 'subnet = "10.20.0.0/24"\nisolation = "open"'
    )
    assert ops(plan(manifest(isolated), host)) == [("network", "update", "lan")]


def test_json_is_complete() -> None:
    p = plan(manifest(), HostState())
    data = json.loads(p.to_json())
    assert data["exit_code"] == 2 and data["summary"]["create"] == 9
    assert data["steps"][0] == {
        "kind": "network",
        "op": "create",
        "name": "lan",
        "note": "",
        "adopt": False,
        "changes": [],
    }
    quota = next(s for s in data["steps"] if s["kind"] == "quota")
    assert {"field": "cpu_percent", "restart": False, "new": 100} in quota["changes"]


def test_render_fits_80_columns() -> None:
    long_cmd = "console=ttyS0 " + "x" * 300
    m = manifest(BASE.replace("memory_mib = 256", f'memory_mib = 256\ncmdline = "{long_cmd}"'))
    host = applied(manifest())
    p = plan(m, host, restart=True)
    text = p.render()
    assert all(len(line) <= 80 for line in text.splitlines()), text
    assert "cmdline:" in text and "…" in text


def test_every_vm_field_has_a_restart_or_live_decision() -> None:
    assert set(VMSpec.model_fields) - {"name"} <= set(VM_FIELDS)


# --------------------------------------------------------------------------- the property

NAMES = ["a", "b", "c"]


@st.composite
def desired_vms(draw: st.DrawFn) -> list[DesiredVM]:
    out = []
    for name in draw(st.lists(st.sampled_from(NAMES), unique=True)):
        spec = VMSpec(
            name=name,
            kernel="/boot/vmlinuz",
            vcpus=draw(st.sampled_from([1, 2])),
            memory_mib=draw(st.sampled_from([128, 256])),
            labels=draw(st.sampled_from([{}, {"tier": "web"}, {"tier": "db"}])),
        )
        out.append(
            DesiredVM(
                spec=spec,
                quota=draw(st.sampled_from([None, Quota(cpu_percent=100), Quota(cpu_percent=200)])),
                snapshot_policy=draw(
                    st.sampled_from([None, SnapshotPolicySpec(retention="daily:7")])
                ),
                warm_start=draw(st.booleans()),
                network_name=draw(st.sampled_from([None, "n1"])),
                running=draw(st.sampled_from([None, True, False])),
            )
        )
    return out


@st.composite
def hosts(draw: st.DrawFn) -> HostState:
    vms = []
    for name in draw(st.lists(st.sampled_from([*NAMES, "hand"]), unique=True)):
        spec = VMSpec(
            name=name,
            kernel="/boot/vmlinuz",
            vcpus=draw(st.sampled_from([1, 2])),
            memory_mib=draw(st.sampled_from([128, 256])),
            labels=draw(st.sampled_from([{}, {"tier": "web"}])),
        )
        vms.append(
            VMRecord(
                spec=spec,
                state=draw(st.sampled_from(list(VMState))),
                quota=draw(st.sampled_from([None, Quota(cpu_percent=100)])),
                snapshot_policy=draw(
                    st.sampled_from([None, SnapshotPolicySpec(retention="weekly:4")])
                ),
                warm_start=draw(st.booleans()),
                network_name=draw(st.sampled_from([None, "n1", "n2"])),
                managed_by=draw(st.sampled_from([None, MANAGER])),
            )
        )
    schedules = [
        ScheduleState(
            name=name,
            action=draw(st.sampled_from(["start", "stop"])),
            cron=draw(st.sampled_from(["0 8 * * *", "0 9 * * *"])),
            tz="UTC",
            grace_s=600.0,
            selector={"tier": "web"},
            managed_by=draw(st.sampled_from([None, MANAGER])),
        )
        for name in draw(st.lists(st.sampled_from(["s1", "s2", "s3"]), unique=True))
    ]
    networks = [
        NetworkRecord(
            name,
            draw(st.sampled_from(["10.1.0.0/24", "10.2.0.0/24"])),
            draw(st.sampled_from(["isolated", "open"])),
            draw(st.sampled_from([None, MANAGER])),
        )
        for name in draw(st.lists(st.sampled_from(["n1", "n2"]), unique=True))
    ]
    return HostState(tuple(vms), tuple(schedules), tuple(networks))


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    vms = draw(desired_vms())
    schedules = [
        DesiredSchedule(
            name,
            ScheduleSpec(
                name=name,
                action=draw(st.sampled_from(["start", "stop"])),
                selector={"tier": "web"},
                cron=draw(st.sampled_from(["0 8 * * *", "0 9 * * *"])),
            ),
        )
        for name in draw(st.lists(st.sampled_from(["s1", "s2"]), unique=True))
    ]
    networks = [
        NetworkSpec(name="n1", subnet=draw(st.sampled_from(["10.1.0.0/24", "10.3.0.0/24"])))
    ]
    return Manifest(tuple(vms), tuple(schedules), tuple(networks))


@settings(max_examples=150, deadline=None)
@given(manifests(), hosts(), st.booleans())
def test_applying_a_plan_leaves_nothing_to_do(m: Manifest, host: HostState, prune: bool) -> None:
    first = plan(m, host, prune=prune, restart=True)
    after = first.state_after()
    second = plan(m, after, prune=prune, restart=True, last_applied=first.record())
    assert second.steps == (), second.render()
    assert second.drift == ()


@settings(max_examples=100, deadline=None)
@given(manifests(), hosts())
def test_without_restart_only_pending_restarts_remain(m: Manifest, host: HostState) -> None:
    first = plan(m, host, prune=True)
    after = first.state_after()
    second = plan(m, after, prune=True)
    assert {s.op for s in second.steps} <= {Op.PENDING}
    assert all(c.restart for s in second.steps for c in s.changes)
    assert second.state_after() == after  # a second apply changes nothing
