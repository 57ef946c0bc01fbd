"""Snapshots, restores, retention policies and pruning as the API shows them."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from stoker.domain.spec import NAME_PATTERN
from stoker.wire.vms import VMOut


class CreateSnapshot(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    kind: Literal["manual", "pre-update"] = Field(
        default="manual",
        description="pre-update snapshots are protected until released (unprotect)",
    )
    tags: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:=-]{1,64}$")]] = Field(
        default_factory=list, max_length=16
    )
    protected: StrictBool | None = Field(
        default=None, description="never removed by pruning (default: true for pre-update)"
    )


class VerificationOut(BaseModel):
    at: datetime
    ok: bool
    deep: bool
    detail: str
    duration_s: float


class FileOut(BaseModel):
    name: str
    size: int
    sha256: str


class SnapshotOut(BaseModel):
    id: str
    vm_id: str
    vm_name: str
    created_at: datetime
    kind: str
    tags: list[str]
    protected: bool
    with_memory: bool = Field(description="false when the VM was not running: disks only")
    size_bytes: int
    pause_s: float | None = Field(description="how long the guest was paused")
    last_verification: VerificationOut | None
    files: list[FileOut] | None = None


class RestoreRequest(BaseModel):
    """Restore into the snapshot's own VM (no body), or into a new VM named ``as``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    as_: str | None = Field(
        default=None,
        alias="as",
        pattern=NAME_PATTERN,
        description="create a new VM with this name from the snapshot (its disks are copied "
        "beside the snapshotted VM's disks, named <name>-vd<i>.<format>); the snapshot's "
        "own VM, if it still exists, is left alone",
        examples=["web-restored"],
    )


class RestoreOut(BaseModel):
    snapshot: SnapshotOut
    vm: VMOut


class PolicyIn(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    retention: str | None = Field(
        default=None,
        max_length=512,
        description="rules like 'daily:7,weekly:4' (last, hourly, daily, weekly, monthly, "
        "yearly: N; within: DURATION); null or empty: no pruning",
        examples=["daily:7,weekly:4"],
    )
    interval: str | None = Field(
        default=None,
        max_length=64,
        description="take an automatic snapshot this often while the VM runs, e.g. '1d', "
        "'6h'; null or empty: no automatic snapshots",
        examples=["1d"],
    )


class PolicyOut(BaseModel):
    vm_id: str
    vm_name: str
    retention: str | None
    interval: str | None
    timezone: str = Field(description="the zone retention periods are evaluated in")
    last_auto_at: datetime | None
    next_auto_at: datetime | None


class PruneItemOut(BaseModel):
    id: str
    created_at: datetime
    reasons: list[str]
    size_bytes: int


class PruneOut(BaseModel):
    vm_id: str
    vm_name: str
    policy: str
    timezone: str
    dry_run: bool
    keep: list[PruneItemOut]
    remove: list[PruneItemOut]
    freed_bytes: int = Field(description="freed, or that would be freed on a dry run")


class AutoSnapshotOut(BaseModel):
    snapshot: SnapshotOut
    prune: PruneOut | None
