"""The VM state machine as data: states, allowed transitions, and which actions each state allows.

Everything that changes a VM's state asks this table first; the lifecycle service is the only
writer. Keeping the table as plain data lets the tests enumerate every legal and illegal move.
"""

from __future__ import annotations

from enum import StrEnum


class VMState(StrEnum):
    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    RESTARTING = "restarting"
    ERROR = "error"


class Action(StrEnum):
    """What an operator (or a loop acting for one) can ask of a VM."""

    START = "start"
    STOP = "stop"
    RESTART = "restart"
    DELETE = "delete"


S = VMState

#: Every allowed (from, to) edge. The seed's diagram, plus the failure edges a real VMM needs:
#: a VMM can die or hang while starting or restarting, a guest can power itself off while
#: running, and an operator can abort a boot that is taking too long.
TRANSITIONS: frozenset[tuple[VMState, VMState]] = frozenset(
    {
        (S.PENDING, S.STARTING),  # start
        (S.STOPPED, S.STARTING),  # start again
        (S.STARTING, S.RUNNING),  # guest ready
        (S.STARTING, S.ERROR),  # boot timeout, VMM died during boot
        (S.STARTING, S.STOPPING),  # operator aborts a boot
        (S.RUNNING, S.STOPPING),  # stop
        (S.STOPPING, S.STOPPED),  # VMM gone
        (S.RUNNING, S.STOPPED),  # the guest powered itself off
        (S.RUNNING, S.RESTARTING),  # restart
        (S.RESTARTING, S.RUNNING),  # restarted
        (S.RESTARTING, S.ERROR),  # restart failed or stuck
        (S.RUNNING, S.ERROR),  # failure
        (S.ERROR, S.STOPPED),  # cleanup
    }
)

#: The states from which each action may be requested.
ACTIONS: dict[Action, frozenset[VMState]] = {
    Action.START: frozenset({S.PENDING, S.STOPPED}),
    Action.STOP: frozenset({S.RUNNING, S.STARTING, S.ERROR}),
    Action.RESTART: frozenset({S.RUNNING, S.STOPPED, S.ERROR}),
    Action.DELETE: frozenset({S.PENDING, S.STOPPED, S.ERROR}),
}

#: States in which a VMM process is expected to exist.
ACTIVE_STATES: frozenset[VMState] = frozenset({S.STARTING, S.RUNNING, S.STOPPING, S.RESTARTING})

#: States that only last while an operation is under way; a watchdog bounds each of them.
TRANSIENT_STATES: frozenset[VMState] = frozenset({S.STARTING, S.STOPPING, S.RESTARTING})


class IllegalTransition(Exception):
    """A state change that the table does not allow; a bug in the caller, not bad input."""

    def __init__(self, current: VMState, target: VMState) -> None:
        super().__init__(f"cannot go from {current} to {target}")
        self.current = current
        self.target = target


class IllegalAction(Exception):
    """An action the VM's current state does not allow; answered as 409 with what is allowed."""

    def __init__(self, action: Action, current: VMState) -> None:
        self.action = action
        self.current = current
        self.allowed = allowed_actions(current)
        allowed = ", ".join(a.value for a in self.allowed) or "none"
        super().__init__(
            f"cannot {action.value} a VM that is {current.value}; "
            f"actions allowed from {current.value}: {allowed}"
        )


def can_transition(current: VMState, target: VMState) -> bool:
    return (current, target) in TRANSITIONS


def check_transition(current: VMState, target: VMState) -> None:
    if not can_transition(current, target):
        raise IllegalTransition(current, target)


def allowed_actions(state: VMState) -> tuple[Action, ...]:
    """Actions allowed from ``state``, in a stable order for messages."""
    return tuple(a for a in Action if state in ACTIONS[a])


def check_action(action: Action, state: VMState) -> None:
    if state not in ACTIONS[action]:
        raise IllegalAction(action, state)
