"""Response shapes of the API (request shapes are the domain's own models)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from stoker.domain.spec import VMSpec
from stoker.domain.states import VMState, allowed_actions
from stoker.domain.vm import VM


class TransitionOut(BaseModel):
    from_state: VMState | None
    to_state: VMState
    reason: str
    at: datetime


class ProcessOut(BaseModel):
    pid: int
    accel: str = ""


class RestartInfo(BaseModel):
    count: int
    last_restart_at: datetime | None
    next_retry_at: datetime | None


class VMOut(BaseModel):
    id: str
    name: str
    state: VMState
    state_reason: str
    state_since: datetime
    created_at: datetime
    allowed_actions: list[str]
    process: ProcessOut | None
    restart: RestartInfo
    spec: VMSpec
    transitions: list[TransitionOut] = Field(default_factory=list)

    @classmethod
    def of(cls, vm: VM) -> VMOut:
        process = None
        if vm.process:
            process = ProcessOut(pid=vm.process.pid, accel=vm.process.accel)
        return cls(
            id=vm.id,
            name=vm.name,
            state=vm.state,
            state_reason=vm.state_reason,
            state_since=vm.state_since,
            created_at=vm.created_at,
            allowed_actions=[a.value for a in allowed_actions(vm.state)],
            process=process,
            restart=RestartInfo(
                count=vm.restart_count,
                last_restart_at=vm.last_restart_at,
                next_retry_at=vm.next_retry_at,
            ),
            spec=vm.spec,
            transitions=[
                TransitionOut(
                    from_state=t.from_state, to_state=t.to_state, reason=t.reason, at=t.at
                )
                for t in vm.transitions
            ],
        )


class StopRequest(BaseModel):
    graceful: bool = True
    timeout_s: float | None = Field(default=None, gt=0, le=86_400)


class RestartRequest(BaseModel):
    graceful: bool = True


class ConsoleOut(BaseModel):
    vm: str
    text: str
    truncated: bool


class HealthOut(BaseModel):
    vm: str
    state: VMState
    health: str = Field(description="healthy, unhealthy or unknown")
    vmm: dict[str, Any]
    probes: list[dict[str, Any]] = Field(default_factory=list)
    consecutive_failures: int = 0
    last_error: str | None = None
    since: datetime | None = Field(default=None, description="when the verdict last changed")
    reason: str | None = Field(default=None, description="why the verdict is what it is")
