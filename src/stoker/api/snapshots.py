"""/api/v1/snapshots and /api/v1/vms/{ref}/snapshots: snapshots, restore, verify, retention.

Every call here is synchronous: it answers when the work is done (a snapshot of a running
guest pauses it for the memory save and disk copy; a restore answers once the VM runs).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Response, status

from stoker.api.deps import services
from stoker.api.problems import PROBLEM_RESPONSES
from stoker.api.shapes import policy_out, prune_out, snapshot_out, vm_out
from stoker.services.container import Services
from stoker.wire import (
    AutoSnapshotOut,
    CreateSnapshot,
    PolicyIn,
    PolicyOut,
    PruneOut,
    RestoreOut,
    RestoreRequest,
    SnapshotOut,
)

router = APIRouter(tags=["snapshots"], responses=PROBLEM_RESPONSES)

Svc = Annotated[Services, Depends(services)]
SnapshotId = Annotated[
    str, Path(pattern=r"^[0-9a-z-]{1,64}$", description="snapshot id, as `list` shows it")
]


# ------------------------------------------------------------------------ per-VM routes


@router.post(
    "/api/v1/vms/{ref}/snapshots", status_code=status.HTTP_201_CREATED, response_model=SnapshotOut
)
async def create_snapshot(ref: str, svc: Svc, body: CreateSnapshot | None = None) -> SnapshotOut:
    """Snapshot a running VM (memory + disks, paused briefly) or a stopped one (disks).

    Refused with 409 when free disk space is below the expected size plus the margin.
    """
    body = body or CreateSnapshot()
    snap = await svc.snapshots.create(
        ref, kind=body.kind, tags=tuple(body.tags), protected=body.protected
    )
    return snapshot_out(snap)


@router.get("/api/v1/vms/{ref}/snapshots", response_model=list[SnapshotOut])
async def list_vm_snapshots(ref: str, svc: Svc) -> list[SnapshotOut]:
    """The VM's snapshots, oldest first."""
    return [snapshot_out(s) for s in svc.snapshots.all(ref)]


@router.post(
    "/api/v1/vms/{ref}/snapshots/auto",
    status_code=status.HTTP_201_CREATED,
    response_model=AutoSnapshotOut,
)
async def auto_snapshot(ref: str, svc: Svc) -> AutoSnapshotOut:
    """Take an automatic snapshot now, then prune by the VM's retention policy (if any)."""
    result = await svc.snapshots.auto_snapshot(ref)
    return AutoSnapshotOut(
        snapshot=snapshot_out(result.snapshot),
        prune=prune_out(result.prune) if result.prune else None,
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
    return prune_out(await svc.snapshots.prune(ref, dry_run=dry_run))


@router.get("/api/v1/vms/{ref}/snapshot-policy", response_model=PolicyOut)
async def get_policy(ref: str, svc: Svc) -> PolicyOut:
    return policy_out(svc.snapshots.get_policy(ref))


@router.put("/api/v1/vms/{ref}/snapshot-policy", response_model=PolicyOut)
async def put_policy(ref: str, body: PolicyIn, svc: Svc) -> PolicyOut:
    """Set the VM's retention rules and automatic snapshot interval (replaces both)."""
    return policy_out(svc.snapshots.set_policy(ref, body.retention, body.interval))


# ----------------------------------------------------------------- snapshot routes


@router.get("/api/v1/snapshots", response_model=list[SnapshotOut])
async def list_snapshots(
    svc: Svc,
    vm: Annotated[
        str | None,
        Query(max_length=64, description="only this VM (id or name; a deleted VM's kept ones)"),
    ] = None,
) -> list[SnapshotOut]:
    """Every snapshot on this host, oldest first."""
    return [snapshot_out(s) for s in svc.snapshots.all(vm)]


@router.get("/api/v1/snapshots/{snapshot_id}", response_model=SnapshotOut)
async def get_snapshot(snapshot_id: SnapshotId, svc: Svc) -> SnapshotOut:
    """One snapshot with its files, sizes and checksums, and its last verification."""
    snap = svc.snapshots.get(snapshot_id)
    return snapshot_out(snap, svc.snapshots.manifest(snap))


@router.delete("/api/v1/snapshots/{snapshot_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_snapshot(
    snapshot_id: SnapshotId,
    svc: Svc,
    force: Annotated[bool, Query(description="delete even if protected")] = False,
) -> Response:
    await svc.snapshots.delete(snapshot_id, force=force)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/api/v1/snapshots/{snapshot_id}/restore", response_model=RestoreOut)
async def restore_snapshot(
    snapshot_id: SnapshotId, svc: Svc, body: RestoreRequest | None = None
) -> RestoreOut:
    """Stop the VM if it runs, restore its disks and memory, and run it as it was; with
    ``as``, create a new VM of that name from the snapshot instead (a snapshot kept after
    its VM was deleted can only be restored this way)."""
    as_name = body.as_ if body is not None else None
    snap, vm = await svc.snapshots.restore(snapshot_id, as_name=as_name)
    return RestoreOut(snapshot=snapshot_out(snap), vm=vm_out(vm))


@router.post("/api/v1/snapshots/{snapshot_id}/verify", response_model=SnapshotOut)
async def verify_snapshot(
    snapshot_id: SnapshotId,
    svc: Svc,
    deep: Annotated[
        bool, Query(description="also run the snapshot in a throwaway VM until it is ready")
    ] = False,
) -> SnapshotOut:
    """Recompute checksums (and qemu-img check qcow2 images); the result is recorded."""
    return snapshot_out(await svc.snapshots.verify(snapshot_id, deep=deep))


@router.post("/api/v1/snapshots/{snapshot_id}/protect", response_model=SnapshotOut)
async def protect_snapshot(snapshot_id: SnapshotId, svc: Svc) -> SnapshotOut:
    """Pruning never removes a protected snapshot."""
    return snapshot_out(svc.snapshots.set_protected(snapshot_id, True))


@router.post("/api/v1/snapshots/{snapshot_id}/unprotect", response_model=SnapshotOut)
async def unprotect_snapshot(snapshot_id: SnapshotId, svc: Svc) -> SnapshotOut:
    """Release a protected (or pre-update) snapshot to the retention policy."""
    return snapshot_out(svc.snapshots.set_protected(snapshot_id, False))
