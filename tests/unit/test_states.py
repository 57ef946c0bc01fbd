"""Every legal and illegal transition and action of the state table."""

from itertools import product

import pytest

from stoker.domain.states import (
    ACTIONS,
    TRANSITIONS,
    Action,
    IllegalAction,
    IllegalTransition,
    VMState,
    allowed_actions,
    can_transition,
    check_action,
    check_transition,
)

S = VMState

SEED_EDGES = {
    (S.PENDING, S.STARTING),
    (S.STARTING, S.RUNNING),
    (S.RUNNING, S.STOPPING),
    (S.STOPPING, S.STOPPED),
    (S.STOPPED, S.STARTING),
    (S.RUNNING, S.RESTARTING),
    (S.RESTARTING, S.RUNNING),
    (S.RUNNING, S.ERROR),
    (S.ERROR, S.STOPPED),
}


def test_the_seed_diagram_is_allowed():
    assert SEED_EDGES <= TRANSITIONS


@pytest.mark.parametrize(("current", "target"), sorted(product(S, S)))
def test_every_pair(current, target):
    if (current, target) in TRANSITIONS:
        check_transition(current, target)
        assert can_transition(current, target)
    else:
        with pytest.raises(IllegalTransition):
            check_transition(current, target)


def test_no_way_back_to_pending_and_no_self_loops():
    assert not any(target == S.PENDING for _, target in TRANSITIONS)
    assert not any(a == b for a, b in TRANSITIONS)


def test_error_only_cleans_up_to_stopped():
    assert {t for f, t in TRANSITIONS if f == S.ERROR} == {S.STOPPED}


@pytest.mark.parametrize(("action", "state"), sorted(product(Action, S)))
def test_every_action_in_every_state(action, state):
    if state in ACTIONS[action]:
        check_action(action, state)
        assert action in allowed_actions(state)
    else:
        with pytest.raises(IllegalAction) as info:
            check_action(action, state)
        message = str(info.value)
        assert state.value in message and action.value in message
        for allowed in allowed_actions(state):
            assert allowed.value in message


def test_start_only_from_pending_or_stopped():
    assert ACTIONS[Action.START] == {S.PENDING, S.STOPPED}


def test_running_vm_cannot_be_deleted_without_force():
    assert S.RUNNING not in ACTIONS[Action.DELETE]


def test_illegal_action_lists_allowed_actions():
    with pytest.raises(IllegalAction) as info:
        check_action(Action.START, S.RUNNING)
    assert info.value.allowed == (Action.STOP, Action.RESTART)
    assert "actions allowed from running: stop, restart" in str(info.value)
