"""A VM as stoker knows it: the operator's spec plus what has happened to it."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from stoker.domain.process import ProcessRecord
from stoker.domain.spec import VMSpec
from stoker.domain.states import VMState


@dataclass(frozen=True)
class Transition:
    from_state: VMState | None
    to_state: VMState
    reason: str
    at: datetime


@dataclass(frozen=True)
class VM:
    id: str
    name: str
    spec: VMSpec
    state: VMState
    state_reason: str
    state_since: datetime
    created_at: datetime
    process: ProcessRecord | None = None
    restart_count: int = 0
    last_restart_at: datetime | None = None
    next_retry_at: datetime | None = None
    transitions: tuple[Transition, ...] = field(default=())
    #: why the stored record could not be decoded; such a VM is shown in ``error`` with the
    #: reason "record unreadable" and only ``delete`` acts on it (its spec is a placeholder)
    unreadable: str | None = None
