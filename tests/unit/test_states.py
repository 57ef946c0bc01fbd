"""Every (from, to) pair of states and every (action, state) pair, against a table written here.

The expected tables are written out independently of ``stoker.domain.states``: the seed's
diagram (shared/seeds/004_8783d82de98be0b4.txt) plus the extra edges and the action table of
docs/architecture.md "Lifecycle". The product is asked only through its public functions
(``can_transition``, ``check_transition``, ``check_action``, ``allowed_actions``), never
through the tables it reads, so a wrong, missing or extra edge fails here.
"""

from __future__ import annotations

from itertools import product

import pytest

from stoker.domain.states import (
    ACTIVE_STATES,
    TRANSIENT_STATES,
    Action,
    IllegalAction,
    IllegalTransition,
    VMState,
    allowed_actions,
    can_transition,
    check_action,
    check_transition,
)

STATES = ("pending", "starting", "running", "stopping", "stopped", "restarting", "error")
#: The order allowed_actions() and its 409 message list actions in.
ACTION_ORDER = ("start", "stop", "restart", "delete")

#: The seed's stateDiagram-v2. Its "[*] --> pending: Create" is not an edge between two
#: states: a VM is born pending (Lifecycle.create writes it), and no edge leads back there.
SEED_EDGES = {
    ("pending", "starting"),  # Start
    ("starting", "running"),  # Started
    ("running", "stopping"),  # Stop
    ("stopping", "stopped"),  # Stopped
    ("stopped", "starting"),  # Restart (from stopped it is a fresh boot)
    ("running", "restarting"),  # Restart
    ("restarting", "running"),  # Restarted
    ("running", "error"),  # Failure
    ("error", "stopped"),  # Cleanup
}

#: docs/architecture.md "Lifecycle": the edges a real VMM needs beyond the diagram.
DOCUMENTED_EDGES = {
    ("starting", "error"),  # boot timeout, or the VMM died during boot
    ("starting", "stopping"),  # an operator aborts a boot
    ("restarting", "error"),  # the restart failed or got stuck (watchdog)
    ("running", "stopped"),  # the guest powered itself off (QEMU SHUTDOWN, not a crash)
}

#: src/stoker/domain/states.py TRANSITIONS holds exactly these 13 edges today: every one of
#: its edges is in one of the two lists above, so there is no further edge to justify.
#: Not an edge: error -> error. Lifecycle.set_state lets a VM in error restate its reason
#: (the restart policy giving up) without asking the table, so the table refuses it.
EXPECTED_EDGES = SEED_EDGES | DOCUMENTED_EDGES

#: docs/architecture.md "Lifecycle": the states each action may be asked from.
EXPECTED_ACTIONS = {
    "start": {"pending", "stopped"},
    "stop": {"running", "starting", "error"},  # from error, stop is the cleanup
    "restart": {"running", "stopped", "error"},
    "delete": {"pending", "stopped", "error"},  # a running VM needs force (checked elsewhere)
}

ALL_PAIRS = sorted(product(STATES, STATES))


def test_the_enumerations_are_the_ones_these_tables_cover() -> None:
    assert [s.value for s in VMState] == list(STATES)
    assert [a.value for a in Action] == list(ACTION_ORDER)
    assert len(EXPECTED_EDGES) == 13
    assert set(ALL_PAIRS) >= EXPECTED_EDGES


@pytest.mark.parametrize(("current", "target"), ALL_PAIRS)
def test_every_pair_of_states(current: str, target: str) -> None:
    came, to = VMState(current), VMState(target)
    if (current, target) in EXPECTED_EDGES:
        assert can_transition(came, to)
        check_transition(came, to)
    else:
        assert not can_transition(came, to)
        with pytest.raises(IllegalTransition) as info:
            check_transition(came, to)
        assert (info.value.current, info.value.target) == (came, to)
        assert str(info.value) == f"cannot go from {current} to {target}"


def test_nothing_leads_back_to_pending_and_no_state_loops_to_itself() -> None:
    for state in STATES:
        assert not can_transition(VMState(state), VMState.PENDING)
        assert not can_transition(VMState(state), VMState(state))


def test_error_only_cleans_up_to_stopped() -> None:
    reachable = {t for t in STATES if can_transition(VMState.ERROR, VMState(t))}
    assert reachable == {"stopped"}


@pytest.mark.parametrize(("action", "state"), sorted(product(ACTION_ORDER, STATES)))
def test_every_action_in_every_state(action: str, state: str) -> None:
    asked, current = Action(action), VMState(state)
    allowed_here = [a for a in ACTION_ORDER if state in EXPECTED_ACTIONS[a]]
    assert [a.value for a in allowed_actions(current)] == allowed_here
    if state in EXPECTED_ACTIONS[action]:
        check_action(asked, current)
        return
    with pytest.raises(IllegalAction) as info:
        check_action(asked, current)
    assert (info.value.action, info.value.current) == (asked, current)
    assert [a.value for a in info.value.allowed] == allowed_here
    listed = ", ".join(allowed_here) or "none"
    assert str(info.value) == (
        f"cannot {action} a VM that is {state}; actions allowed from {state}: {listed}"
    )


def test_start_only_from_pending_or_stopped() -> None:
    startable = set()
    for state in STATES:
        try:
            check_action(Action.START, VMState(state))
        except IllegalAction:
            continue
        startable.add(state)
    assert startable == {"pending", "stopped"}


def test_running_vm_cannot_be_deleted_without_force() -> None:
    with pytest.raises(IllegalAction):
        check_action(Action.DELETE, VMState.RUNNING)


def test_illegal_action_lists_allowed_actions() -> None:
    with pytest.raises(IllegalAction) as info:
        check_action(Action.START, VMState.RUNNING)
    assert info.value.allowed == (Action.STOP, Action.RESTART)
    assert "actions allowed from running: stop, restart" in str(info.value)


def test_states_with_a_vmm_and_states_a_watchdog_bounds() -> None:
    # a VMM exists from spawn (starting) until it is gone (stopped/error); pending never had one
    assert {s.value for s in ACTIVE_STATES} == {"starting", "running", "stopping", "restarting"}
    # only the states an operation is passing through: running is where a VM is meant to stay
    assert {s.value for s in TRANSIENT_STATES} == {"starting", "stopping", "restarting"}
