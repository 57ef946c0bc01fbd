"""A VM's quota as the API shows it: every limit, where it comes from and how it binds."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from stoker.domain.states import VMState

Number = float | int


class LimitOut(BaseModel):
    value: Number | None
    source: Literal["vm", "default", "none"]
    status: Literal["unlimited", "not enforceable", "failed", "enforced", "pending"]
    how: str | None = Field(default=None, description="what makes it bind, when enforced")
    reason: str | None = Field(default=None, description="why it does not bind (yet)")
    vmm_limit_bytes: int | None = Field(
        default=None, description="memory only: the VMM's cgroup limit, guest RAM + overhead"
    )


class ViolationOut(BaseModel):
    kind: str
    episodes: int = Field(description="separate times the limit was hit")
    samples: int = Field(description="monitoring intervals spent at the limit")
    total: float
    first_at: datetime
    last_at: datetime
    last_detail: str


class DriveThrottleOut(BaseModel):
    device: str
    iops: int
    bytes_per_s: int
    group: str | None = None


class ObservedOut(BaseModel):
    """What the VMM itself reports in force on its drives, or why it could not say."""

    drives: list[DriveThrottleOut] | None = None
    error: str | None = None


class QuotaOut(BaseModel):
    vm: str
    vm_id: str
    state: VMState
    override: dict[str, Number] = Field(description="the VM's own values")
    defaults: dict[str, Number] = Field(description="the agent's [quotas] defaults")
    effective: dict[str, Number] = Field(description="override over defaults")
    limits: dict[str, LimitOut]
    applied_at: datetime | None
    cgroup: str | None
    usage: dict[str, Number | None]
    violations: dict[str, ViolationOut]
    observed: ObservedOut | None = None
