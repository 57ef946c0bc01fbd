"""VMs as the API shows them, and the bodies of the requests that drive them."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from stoker.domain.spec import VMSpec
from stoker.domain.states import VMState


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


class BootSnapshotOut(BaseModel):
    """A boot snapshot: what a warm start resumes instead of booting."""

    ready: bool
    size_bytes: int
    created_at: datetime
    key: str


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
    boot_snapshot: BootSnapshotOut | None = Field(
        default=None,
        description="the VM's boot snapshot for warm starts, when it has one (shown for one "
        "VM, not in listings)",
    )


class StopRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    graceful: StrictBool = True
    timeout_s: float | None = Field(default=None, gt=0, le=86_400)


class RestartRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    graceful: StrictBool = True


class ConsoleOut(BaseModel):
    vm: str
    text: str
    truncated: bool


class VMMLivenessOut(BaseModel):
    process_alive: bool
    control_socket: str | None = Field(
        description="'answering', 'not answering: why', or null when no VMM runs"
    )
    vmm_status: str | None = Field(description="the VMM's own word for its state")


class ProbeResultOut(BaseModel):
    ok: bool
    message: str
    at: datetime
    duration_s: float


class ProbeStatusOut(BaseModel):
    name: str
    kind: str
    status: str = Field(description="healthy, unhealthy or unknown")
    consecutive_failures: int
    consecutive_successes: int
    last_message: str | None
    last_error: str | None
    last_at: datetime | None
    last_ok_at: datetime | None
    checks: int
    failures: int
    history: list[ProbeResultOut]
    #: the settings it runs under; null for a probe no longer in the spec
    interval_s: float | None = None
    timeout_s: float | None = None
    failure_threshold: int | None = None
    success_threshold: int | None = None


class HealthOut(BaseModel):
    vm: str
    state: VMState
    health: str = Field(description="healthy, unhealthy or unknown")
    vmm: VMMLivenessOut
    probes: list[ProbeStatusOut] = Field(default_factory=list)
    consecutive_failures: int = 0
    last_error: str | None = None
    since: datetime | None = Field(default=None, description="when the verdict last changed")
    reason: str | None = Field(default=None, description="why the verdict is what it is")


class VersionOut(BaseModel):
    version: str
