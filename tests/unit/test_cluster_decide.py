"""What a node does next about one cluster VM, case by case."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

from stoker.cluster.decide import Do, Facts, Local, decide, needs_report
from stoker.cluster.records import OwnerRecord, PlacementRecord, StatusRecord, VMRecord
from stoker.domain.spec import VMSpec
from stoker.domain.states import VMState as S

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
LEASE = 0xA1


def record(desired: str = "running") -> VMRecord:
    return VMRecord(
        spec=VMSpec(name="web", kernel="/k"),
        desired="running" if desired == "running" else "stopped",
        created_by="n1",
        created_at=NOW,
    )


def placement(node: str = "me", incarnation: int = 7) -> PlacementRecord:
    return PlacementRecord(
        node=node, incarnation=incarnation, summary="x", decided_by="n1", decided_at=NOW
    )


def owner(node: str = "me", lease: int = LEASE) -> OwnerRecord:
    return OwnerRecord(node=node, lease=lease, incarnation=7, since=NOW)


def local(state: S = S.PENDING, incarnation: int | None = 7, **kw: bool) -> Local:
    return Local(state=state, reason="r", incarnation=incarnation, **kw)


BASE = Facts(
    me="me",
    lease=LEASE,
    may_run=True,
    incarnation=7,
    record=record(),
    placement=placement(),
    owner=None,
    status=None,
    local=None,
)


def steps(f: Facts) -> list[Do]:
    return [s.do for s in decide(f).steps]


def test_placed_here_without_a_copy_creates_one() -> None:
    assert steps(BASE) == [Do.CREATE_LOCAL]


def test_nobody_owns_it_take_ownership_then_start() -> None:
    assert steps(replace(BASE, local=local())) == [Do.TAKE_OWNER, Do.START]


def test_owned_here_and_stopped_starts() -> None:
    assert steps(replace(BASE, local=local(S.STOPPED), owner=owner())) == [Do.START]


def test_never_starts_while_the_lease_is_not_in_good_standing() -> None:
    verdict = decide(replace(BASE, local=local(), may_run=False))
    assert verdict.steps == ()
    assert verdict.report is not None and "not starting" in verdict.report[1]


def test_an_owner_record_under_an_older_lease_of_this_node_is_not_ours() -> None:
    f = replace(BASE, local=local(), owner=owner(lease=0xB2))
    verdict = decide(f)
    assert verdict.steps == ()
    assert verdict.report == (S.PENDING, "waiting for me to stop it and let go")


def test_a_copy_running_while_another_node_owns_it_is_killed_at_once() -> None:
    f = replace(BASE, local=local(S.RUNNING), owner=owner(node="other", lease=0xC3))
    assert steps(f) == [Do.FORCE_STOP]


def test_running_without_an_owner_while_fenced_is_killed() -> None:
    f = replace(BASE, local=local(S.RUNNING), may_run=False)
    assert steps(f) == [Do.FORCE_STOP]


def test_desired_stopped_stops_then_lets_go() -> None:
    stopping = replace(BASE, record=record("stopped"), owner=owner())
    assert steps(replace(stopping, local=local(S.RUNNING))) == [Do.STOP]
    assert steps(replace(stopping, local=local(S.STOPPED))) == [Do.RELEASE_OWNER]


def test_moved_elsewhere_stops_here_lets_go_and_drops_the_copy() -> None:
    moved = replace(BASE, placement=placement("other"), owner=owner())
    assert steps(replace(moved, local=local(S.RUNNING))) == [Do.STOP]
    assert steps(replace(moved, local=local(S.STOPPING))) == []
    assert steps(replace(moved, local=local(S.STOPPED))) == [Do.RELEASE_OWNER, Do.DELETE_LOCAL]


def test_deleted_from_the_cluster_is_killed_released_and_deleted() -> None:
    gone = replace(BASE, record=None, incarnation=None, placement=None, owner=owner())
    assert steps(replace(gone, local=local(S.RUNNING))) == [Do.FORCE_STOP]
    assert steps(replace(gone, local=local(S.STOPPED))) == [Do.RELEASE_OWNER, Do.DELETE_LOCAL]


def test_a_recreated_name_replaces_the_old_copy() -> None:
    f = replace(BASE, local=local(S.STOPPED, incarnation=3))
    assert steps(f) == [Do.DELETE_LOCAL]


def test_a_local_vm_the_cluster_does_not_manage_is_never_touched() -> None:
    verdict = decide(replace(BASE, local=local(S.RUNNING, incarnation=None)))
    assert verdict.steps == ()
    assert verdict.report is not None and verdict.report[0] == S.ERROR


def test_in_error_restart_unless_its_own_policy_has_one_scheduled() -> None:
    broken = replace(BASE, owner=owner())
    assert steps(replace(broken, local=local(S.ERROR))) == [Do.RESTART]
    assert steps(replace(broken, local=local(S.ERROR, retry_pending=True))) == []


def test_a_changed_spec_is_applied_while_stopped() -> None:
    f = replace(BASE, owner=owner(), local=local(S.STOPPED, spec_differs=True))
    assert steps(f) == [Do.UPDATE_SPEC, Do.START]


def test_reports_only_what_changed() -> None:
    f = replace(BASE, owner=owner(), local=local(S.RUNNING))
    status = StatusRecord(
        node="me", incarnation=7, state=S.RUNNING, reason="r", since=NOW, reported_at=NOW
    )
    assert needs_report(f, S.RUNNING, "r")
    assert not needs_report(replace(f, status=status), S.RUNNING, "r")
    assert needs_report(replace(f, status=status), S.ERROR, "r")
