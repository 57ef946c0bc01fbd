"""Putting a VM back to a snapshot: stop it, swap its disks, resume it from saved memory;
or making a new VM from a snapshot (one kept after its VM was deleted, say).

Everything that can refuse (damaged files, a changed machine, too little space, a directory
others can write to) is checked before the VM is touched, so a refused restore leaves the VM
as it was. Restored disks are new files created with ``O_EXCL | O_NOFOLLOW`` relative to a
descriptor of their directory, which only the agent may write to, then renamed into place:
no write ever follows a symlink.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from stoker.domain.events import EventType
from stoker.domain.snapshots import SnapshotRecord
from stoker.domain.spec import VMSpec
from stoker.domain.states import VMState
from stoker.domain.vm import VM
from stoker.services.errors import Conflict, InvalidSpec
from stoker.services.snapshots import layout
from stoker.services.snapshots.context import SnapshotContext
from stoker.services.snapshots.errors import RestoreFailed
from stoker.services.snapshots.files import (
    UnsafeDirectory,
    allocated_bytes,
    copy_into_new,
    open_private_dir,
)
from stoker.services.snapshots.space import check_space

S = VMState


async def restore_snapshot(ctx: SnapshotContext, snapshot_id: str) -> tuple[SnapshotRecord, VM]:
    """Stop the VM, put its disks back, and resume it from the saved memory."""
    snap = ctx.get(snapshot_id)
    async with ctx.vm_lock(snap.vm_id):
        snap = ctx.get(snapshot_id)
        vm = ctx.lifecycle.directory.find(snap.vm_id)
        if vm is None:
            raise Conflict(
                f"snapshot {snap.id} was kept when its VM {snap.vm_name} was deleted: restore "
                f"it into a new VM (`stoker snapshot restore {snap.id} --as NEWNAME`)"
            )
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
        _check_private_dirs([Path(d.path) for d in vm.spec.drives])
        reason = f"restoring snapshot {snap.id}"
        if vm.state not in (S.STOPPED, S.PENDING):
            vm = await ctx.lifecycle.stop(vm.id, graceful=False, reason=reason)
        async with ctx.lifecycle.exclusive(vm.id):
            try:
                if vm.spec.drives:  # a VM without disks has only memory to restore
                    await asyncio.to_thread(_put_disks_back, vm.spec, root, snap.id)
            except OSError as exc:  # a full disk, say: every disk is still as it was
                _failed(ctx, vm, snap, str(exc))
                raise RestoreFailed(
                    f"restoring the disks of {vm.name} from {snap.id} failed ({exc}); its "
                    f"disks are unchanged and it is {vm.state.value}: free space and retry",
                    current_state=vm.state.value,
                ) from None
        if snap.with_memory:
            await _resume_from_memory(ctx, vm, snap, root)
        vm = ctx.lifecycle.get(vm.id)
        # not waited onto the disk, as the ``running`` it follows: a power cut ends the VM
        # it tells of (the disks put back were fsynced before the VM started)
        with ctx.store.db.write(durable=False):
            event = ctx.events.record(
                EventType.SNAPSHOT_RESTORED,
                f"{vm.name}: restored from snapshot {snap.id}; now {vm.state.value}",
                vm.id,
                snapshot=snap.id,
            )
        ctx.events.deliver(event)
        return snap, vm


async def restore_as_new_vm(
    ctx: SnapshotContext, snapshot_id: str, name: str
) -> tuple[SnapshotRecord, VM]:
    """A new VM named ``name`` from the snapshot: its spec as snapshotted, its disks copied
    beside the snapshotted VM's (``<name>-vd<i>.<format>``), then resumed from the saved
    memory (or left stopped, for a disks-only snapshot). The snapshot's own VM, if it still
    exists, is not touched."""
    snap = ctx.get(snapshot_id)
    async with ctx.vm_lock(snap.vm_id):
        snap = ctx.get(snapshot_id)
        root = Path(snap.path)
        _quick_check(snap, layout.read_manifest(snap))
        then = layout.read_spec(root)
        if ctx.lifecycle.directory.find(name) is not None:
            raise Conflict(f"a VM named {name!r} already exists; choose another name")
        targets = [
            Path(drive.path).with_name(f"{name}-vd{index}.{drive.format.value}")
            for index, drive in enumerate(then.drives)
        ]
        try:
            spec = VMSpec.model_validate(
                {
                    **then.model_dump(exclude_unset=True),
                    "name": name,
                    "drives": [
                        {**d.model_dump(), "path": str(t)}
                        for d, t in zip(then.drives, targets, strict=True)
                    ],
                }
            )
        except ValidationError as exc:
            raise InvalidSpec("as", str(exc.errors()[0]["msg"])) from None
        # what can be checked before a file is written: the kernel and hypervisor, the
        # target directories and names, the space
        ctx.lifecycle.validate_host(spec.model_copy(update={"drives": []}))
        _check_private_dirs(targets)
        for index, target in enumerate(targets):
            if target.exists() or target.is_symlink():
                raise Conflict(f"{target} already exists; choose another name than {name!r}")
            src = root / layout.disk_name(index, then.drives[index].format)
            check_space(
                target.parent, allocated_bytes(src), ctx.config.margin_mib, f"restoring {target}"
            )
        created: list[Path] = []
        try:
            for index, target in enumerate(targets):
                src = root / layout.disk_name(index, then.drives[index].format)
                await asyncio.to_thread(_copy_new, src, target)
                created.append(target)
            vm = await ctx.lifecycle.create(spec)
        except BaseException as exc:
            for path in created:
                with contextlib.suppress(OSError):
                    path.unlink()
            if isinstance(exc, OSError):  # a full disk, say
                raise RestoreFailed(
                    f"copying the disks of snapshot {snap.id} for a new VM {name} failed "
                    f"({exc}); nothing was created: free space and retry"
                ) from None
            raise
        if snap.with_memory:
            await _resume_from_memory(ctx, vm, snap, root)
        vm = ctx.lifecycle.get(vm.id)
        ctx.events.publish(
            EventType.SNAPSHOT_RESTORED,
            f"{vm.name}: created from snapshot {snap.id} of {snap.vm_name}; now {vm.state.value}",
            vm.id,
            snapshot=snap.id,
            source_vm=snap.vm_id,
        )
        return snap, vm


def _failed(ctx: SnapshotContext, vm: VM, snap: SnapshotRecord, why: str) -> None:
    ctx.events.publish(
        EventType.SNAPSHOT_RESTORE_FAILED,
        f"{vm.name}: restore of snapshot {snap.id} failed: {why}",
        vm.id,
        snapshot=snap.id,
    )


def _check_private_dirs(paths: list[Path]) -> None:
    """Every directory a restore writes into is one only the agent can write to."""
    for directory in {p.parent for p in paths}:
        try:
            os.close(open_private_dir(directory))
        except UnsafeDirectory as exc:
            raise Conflict(str(exc)) from None
        except OSError as exc:
            raise Conflict(f"cannot restore into {directory}: {exc.strerror}") from None


def _copy_new(src: Path, target: Path) -> None:
    """Copy ``src`` to the new file ``target``, durably, never through a symlink."""
    dir_fd = open_private_dir(target.parent)
    try:
        copy_into_new(src, dir_fd, target.name)
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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
    """Every disk copied beside its original first (``O_EXCL | O_NOFOLLOW``, relative to the
    directory's descriptor, fsynced), then each renamed over its original: a failed copy (a
    full disk) leaves every disk as it was and no copy behind; never a write through a
    symlink (a link planted at a disk's name is replaced, not followed)."""
    staged: list[tuple[int, str, str]] = []  # (directory descriptor, temp name, disk name)
    try:
        for index, drive in enumerate(spec.drives):
            target = Path(drive.path)
            tmp = layout.restore_temp(target, snapshot_id)
            dir_fd = open_private_dir(target.parent)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp.name, dir_fd=dir_fd)  # a leftover of an interrupted restore
            try:
                copy_into_new(root / layout.disk_name(index, drive.format), dir_fd, tmp.name)
            except BaseException:
                os.close(dir_fd)
                raise
            staged.append((dir_fd, tmp.name, target.name))
        for dir_fd, tmp_name, name in staged:
            os.replace(tmp_name, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.fsync(dir_fd)
    finally:
        for dir_fd, tmp_name, _ in staged:
            with contextlib.suppress(FileNotFoundError):  # gone once renamed into place
                os.unlink(tmp_name, dir_fd=dir_fd)
            os.close(dir_fd)
