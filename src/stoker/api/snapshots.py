"""/api/v1/snapshots and /api/v1/vms/{ref}/snapshots: snapshots, restore, verify, retention.

Every call here is synchronous: it answers when the work is done (a snapshot of a running
guest pauses it for the memory save and disk copy; a restore answers once the VM runs).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Response, status
from pydantic import BaseModel, ConfigDict, Field

from stoker.api.deps import services
from stoker.api.problems import PROBLEM_RESPONSES
from stoker.api.schemas import VMOut
from stoker.domain.snapshots import SnapshotRecord
from stoker.services.container import Services
from stoker.services.errors import Conflict
from stoker.services.snapshots import Policy, PruneItem, PruneResult, SnapshotService

router = APIRouter(tags=["snapshots"], responses=PROBLEM_RESPONSES)

Svc = Annotated[Services, Depends(services)]
SnapshotId = Annotated[
    str, Path(pattern=r"^[0-9a-z-]{1,64}$", description="snapshot id, as `list` shows it")
]


def _snapshots(svc: Services) -> SnapshotService:
    service = svc.extra.get("snapshots")
    if service is None:
        raise Conflict("snapshots are not enabled on this agent")
    return service  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------ shapes


class CreateSnapshot(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["manual", "pre-update"] = Field(
        default="manual",
        description="pre-update snapshots are protected until released (unprotect)",
    )
    tags: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:=-]{1,64}$")]] = Field(
        default_factory=list, max_length=16
    )
    protected: bool | None = Field(
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

    @classmethod
    def of(cls, s: SnapshotRecord, manifest: dict[str, Any] | None = None) -> SnapshotOut:
        v = s.verified
        files = None
        if manifest is not None:
            files = [
                FileOut(name=name, size=info["size"], sha256=info["sha256"])
                for name, info in sorted(manifest.get("files", {}).items())
            ]
        return cls(
            id=s.id,
            vm_id=s.vm_id,
            vm_name=s.vm_name,
            created_at=s.created,
            kind=s.kind,
            tags=list(s.tags),
            protected=s.protected,
            with_memory=s.with_memory,
            size_bytes=s.size_bytes,
            pause_s=s.pause_s,
            last_verification=VerificationOut(**vars(v)) if v else None,
            files=files,
        )


class RestoreOut(BaseModel):
    snapshot: SnapshotOut
    vm: VMOut


class PolicyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

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

    @classmethod
    def of(cls, p: Policy) -> PolicyOut:
        return cls(**vars(p))


class PruneItemOut(BaseModel):
    id: str
    created_at: datetime
    reasons: list[str]
    size_bytes: int

    @classmethod
    def of(cls, item: PruneItem) -> PruneItemOut:
        return cls(
            id=item.id,
            created_at=item.created,
            reasons=list(item.reasons),
            size_bytes=item.size_bytes,
        )


class PruneOut(BaseModel):
    vm_id: str
    vm_name: str
    policy: str
    timezone: str
    dry_run: bool
    keep: list[PruneItemOut]
    remove: list[PruneItemOut]
    freed_bytes: int = Field(description="freed, or that would be freed on a dry run")

    @classmethod
    def of(cls, r: PruneResult) -> PruneOut:
        keep = [PruneItemOut.of(i) for i in r.keep]
        remove = [PruneItemOut.of(i) for i in r.remove]
        return cls(**{**vars(r), "keep": keep, "remove": remove})


class AutoSnapshotOut(BaseModel):
    snapshot: SnapshotOut
    prune: PruneOut | None


# ------------------------------------------------------------------------ per-VM routes


@router.post(
    "/api/v1/vms/{ref}/snapshots", status_code=status.HTTP_201_CREATED, response_model=SnapshotOut
)
async def create_snapshot(ref: str, svc: Svc, body: CreateSnapshot | None = None) -> SnapshotOut:
    """Snapshot a running VM (memory + disks, paused briefly) or a stopped one (disks).

    Refused with 409 when free disk space is below the expected size plus the margin.
    """
    body = body or CreateSnapshot()
    snap = await _snapshots(svc).create(
        ref, kind=body.kind, tags=tuple(body.tags), protected=body.protected
    )
    return SnapshotOut.of(snap)


@router.get("/api/v1/vms/{ref}/snapshots", response_model=list[SnapshotOut])
async def list_vm_snapshots(ref: str, svc: Svc) -> list[SnapshotOut]:
    """The VM's snapshots, oldest first."""
    return [SnapshotOut.of(s) for s in _snapshots(svc).all(ref)]


@router.post(
    "/api/v1/vms/{ref}/snapshots/auto",
    status_code=status.HTTP_201_CREATED,
    response_model=AutoSnapshotOut,
)
async def auto_snapshot(ref: str, svc: Svc) -> AutoSnapshotOut:
    """Take an automatic snapshot now, then prune by the VM's retention policy (if any)."""
    result = await _snapshots(svc).auto_snapshot(ref)
    return AutoSnapshotOut(
        snapshot=SnapshotOut.of(result.snapshot),
        prune=PruneOut.of(result.prune) if result.prune else None,
    )


@router.post("/api/v1/vms/{ref}/snapshots/prune", response_model=PruneOut)
async def prune_snapshots(
    ref: str,
    svc: Svc,
    dry_run: Annotated[bool, Query(description="show the plan with reasons, remove nothing")] = (
        False
    ),
) -> PruneOut:
    """Remove the snapshots the retention policy does not keep (files and all)."""
    return PruneOut.of(await _snapshots(svc).prune(ref, dry_run=dry_run))


@router.get("/api/v1/vms/{ref}/snapshot-policy", response_model=PolicyOut)
async def get_policy(ref: str, svc: Svc) -> PolicyOut:
    return PolicyOut.of(_snapshots(svc).get_policy(ref))


@router.put("/api/v1/vms/{ref}/snapshot-policy", response_model=PolicyOut)
async def put_policy(ref: str, body: PolicyIn, svc: Svc) -> PolicyOut:
    """Set the VM's retention rules and automatic snapshot interval (replaces both)."""
    return PolicyOut.of(_snapshots(svc).set_policy(ref, body.retention, body.interval))


# ----------------------------------------------------------------- snapshot routes


@router.get("/api/v1/snapshots", response_model=list[SnapshotOut])
async def list_snapshots(
    svc: Svc, vm: Annotated[str | None, Query(description="only this VM (id or name)")] = None
) -> list[SnapshotOut]:
    """Every snapshot on this host, oldest first."""
    return [SnapshotOut.of(s) for s in _snapshots(svc).all(vm)]


@router.get("/api/v1/snapshots/{snapshot_id}", response_model=SnapshotOut)
async def get_snapshot(snapshot_id: SnapshotId, svc: Svc) -> SnapshotOut:
    """One snapshot with its files, sizes and checksums, and its last verification."""
    service = _snapshots(svc)
    snap = service.get(snapshot_id)
    return SnapshotOut.of(snap, service.manifest(snap))


@router.delete("/api/v1/snapshots/{snapshot_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_snapshot(
    snapshot_id: SnapshotId,
    svc: Svc,
    force: Annotated[bool, Query(description="delete even if protected")] = False,
) -> Response:
    await _snapshots(svc).delete(snapshot_id, force=force)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/api/v1/snapshots/{snapshot_id}/restore", response_model=RestoreOut)
async def restore_snapshot(snapshot_id: SnapshotId, svc: Svc) -> RestoreOut:
    """Stop the VM if it runs, restore its disks and memory, and run it as it was."""
    snap, vm = await _snapshots(svc).restore(snapshot_id)
    return RestoreOut(snapshot=SnapshotOut.of(snap), vm=VMOut.of(vm))


@router.post("/api/v1/snapshots/{snapshot_id}/verify", response_model=SnapshotOut)
async def verify_snapshot(
    snapshot_id: SnapshotId,
    svc: Svc,
    deep: Annotated[
        bool, Query(description="also run the snapshot in a throwaway VM until it is ready")
    ] = False,
) -> SnapshotOut:
    """Recompute checksums (and qemu-img check qcow2 images); the result is recorded."""
    return SnapshotOut.of(await _snapshots(svc).verify(snapshot_id, deep=deep))


@router.post("/api/v1/snapshots/{snapshot_id}/protect", response_model=SnapshotOut)
async def protect_snapshot(snapshot_id: SnapshotId, svc: Svc) -> SnapshotOut:
    """Pruning never removes a protected snapshot."""
    return SnapshotOut.of(_snapshots(svc).set_protected(snapshot_id, True))


@router.post("/api/v1/snapshots/{snapshot_id}/unprotect", response_model=SnapshotOut)
async def unprotect_snapshot(snapshot_id: SnapshotId, svc: Svc) -> SnapshotOut:
    """Release a protected (or pre-update) snapshot to the retention policy."""
    return SnapshotOut.of(_snapshots(svc).set_protected(snapshot_id, False))
