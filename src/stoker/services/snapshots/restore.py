"""Putting a VM back to a snapshot: stop it, swap its disks, resume it from saved memory.

Everything that can refuse (damaged files, a changed machine, too little space) is checked
before the VM is touched, so a refused restore leaves the VM as it was.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from stoker.domain.events import EventType
from stoker.domain.snapshots import SnapshotRecord
from stoker.domain.spec import VMSpec
from stoker.domain.states import VMState
from stoker.domain.vm import VM
from stoker.services.errors import Conflict
from stoker.services.snapshots import layout
from stoker.services.snapshots.context import SnapshotContext
from stoker.services.snapshots.errors import RestoreFailed
from stoker.services.snapshots.files import allocated_bytes, copy_file, fsync_path
from stoker.services.snapshots.space import check_space

S = VMState


async def restore_snapshot(ctx: SnapshotContext, snapshot_id: str) -> tuple[SnapshotRecord, VM]:
    """Stop the VM, put its disks back, and resume it from the saved memory."""
    snap = ctx.get(snapshot_id)
    async with ctx.vm_lock(snap.vm_id):
        snap = ctx.get(snapshot_id)
        vm = ctx.lifecycle.get(snap.vm_id, 0)
        root = Path(snap.path)
        _quick_check(snap, layout.read_manifest(snap))
        _check_compatible(vm, layout.read_spec(root), snap)
        for index, drive in enumerate(vm.spec.drives):
            src = root / layout.disk_name(index, drive.format)
            check_space(
                Path(drive.path).parent,
                allocated_bytes(src),
                ctx.config.margin_mib,
                f"restoring {drive.path}",
            )
        reason = f"restoring snapshot {snap.id}"
        if vm.state not in (S.STOPPED, S.PENDING):
            vm = await ctx.lifecycle.stop(vm.id, graceful=False, reason=reason)
        async with ctx.lifecycle.exclusive(vm.id):
            await asyncio.to_thread(_put_disks_back, vm.spec, root, snap.id)
        if snap.with_memory:
            await _resume_from_memory(ctx, vm, snap, root)
        vm = ctx.lifecycle.get(vm.id)
        ctx.events.publish(
            EventType.SNAPSHOT_RESTORED,
            f"{vm.name}: restored from snapshot {snap.id}; now {vm.state.value}",
            vm.id,
            snapshot=snap.id,
        )
        return snap, vm


async def _resume_from_memory(
    ctx: SnapshotContext, vm: VM, snap: SnapshotRecord, root: Path
) -> None:
    await ctx.lifecycle.start(
        vm.id, reason=f"restored from snapshot {snap.id}", restore_from=root / layout.MEMORY
    )
    vm = await ctx.lifecycle.wait_settled(vm.id, ctx.config.restore_timeout_s)
    if vm.state != S.RUNNING:
        ctx.events.publish(
            EventType.SNAPSHOT_RESTORE_FAILED,
            f"{vm.name}: restore of snapshot {snap.id} failed: {vm.state_reason}",
            vm.id,
            snapshot=snap.id,
        )
        raise RestoreFailed(
            f"the disks of {vm.name} were restored from {snap.id}, but the VM did "
            f"not come back running ({vm.state.value}: {vm.state_reason}); run "
            f"`stoker snapshot verify {snap.id}` and start the VM to boot from "
            "the restored disks",
            current_state=vm.state.value,
        )


def _quick_check(snap: SnapshotRecord, manifest: dict[str, Any]) -> None:
    """Sizes only (checksums are `verify`'s job): catches a truncated or missing file."""
    root = Path(snap.path)
    for name, info in manifest.get("files", {}).items():
        try:
            size = (root / name).stat().st_size
        except FileNotFoundError:
            raise Conflict(f"snapshot {snap.id} is damaged: {name} is missing") from None
        if size != info["size"]:
            raise Conflict(
                f"snapshot {snap.id} is damaged: {name} has {size} bytes, the manifest "
                f"says {info['size']}; run `stoker snapshot verify {snap.id}`"
            )


def _check_compatible(vm: VM, then: VMSpec, snap: SnapshotRecord) -> None:
    """Saved memory only loads into the same machine; disks only into the same drives."""
    now = vm.spec
    if len(now.drives) != len(then.drives) or any(
        a.format != b.format for a, b in zip(now.drives, then.drives, strict=True)
    ):
        raise Conflict(
            f"{vm.name}'s drives changed since snapshot {snap.id} "
            f"({len(then.drives)} then, {len(now.drives)} now); it cannot be restored"
        )
    if snap.with_memory:
        changed = [
            f
            for f in ("memory_mib", "vcpus", "hypervisor", "kernel", "initrd")
            if getattr(now, f) != getattr(then, f)
        ]
        if now.network.mode != then.network.mode:
            changed.append("network.mode")
        if changed:
            raise Conflict(
                f"{vm.name}'s {', '.join(changed)} changed since snapshot {snap.id}; "
                "its memory state cannot be loaded into a different machine"
            )


def _put_disks_back(spec: VMSpec, root: Path, snapshot_id: str) -> None:
    """Each disk: copy beside the original, fsync, rename over it (never half a disk)."""
    for index, drive in enumerate(spec.drives):
        target = Path(drive.path)
        tmp = layout.restore_temp(target, snapshot_id)
        try:
            copy_file(root / layout.disk_name(index, drive.format), tmp)
            fsync_path(tmp)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_path(target.parent)
