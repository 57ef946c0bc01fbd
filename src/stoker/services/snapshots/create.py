"""Taking a snapshot: memory and disks of a running VM from one instant, or a stopped VM's
disks.

Disks are copied while the VM is paused (``cp --reflink=auto --sparse=always``) rather than
frozen with qcow2 external overlays: an overlay would change which file the running VMM
writes to, so the VM's spec (and every later restart) would have to follow the overlay
chain, and deleting a snapshot would mean a live block commit. A copy leaves the VM's own
files alone, costs nothing extra on reflink file systems, and makes every snapshot
self-contained. The copy happens in the same pause as the memory save, so memory and disks
are from the same instant.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import Literal

from stoker.domain.events import EventType
from stoker.domain.snapshots import SnapshotRecord
from stoker.domain.spec import VMSpec
from stoker.domain.states import VMState
from stoker.domain.units import format_size
from stoker.domain.vm import VM
from stoker.drivers.base import VMM, DriverError
from stoker.host.disk import dir_size
from stoker.services.errors import Conflict
from stoker.services.snapshots import layout
from stoker.services.snapshots.checksums import FileInfo, GrowingFileHasher, hash_tree
from stoker.services.snapshots.context import SnapshotContext
from stoker.services.snapshots.errors import SnapshotFailed
from stoker.services.snapshots.files import copy_file
from stoker.services.snapshots.space import check_space, expected_bytes

S = VMState
Kind = Literal["manual", "auto", "pre-update"]


async def create_snapshot(
    ctx: SnapshotContext,
    vm_ref: str,
    kind: Kind = "manual",
    tags: tuple[str, ...] = (),
    protected: bool | None = None,
) -> SnapshotRecord:
    """Take a snapshot; pre-update snapshots are protected until released."""
    vm = ctx.lifecycle.get(vm_ref, 0)
    if protected is None:
        protected = kind == "pre-update"
    async with ctx.vm_lock(vm.id):
        return await _create_locked(ctx, vm.id, kind, tags, protected)


def new_id(at: datetime) -> str:
    """Sortable by time, unique by a random tail: ``20261121-063000-a1b2c3``."""
    return f"{at:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


async def _create_locked(
    ctx: SnapshotContext, vm_id: str, kind: Kind, tags: tuple[str, ...], protected: bool
) -> SnapshotRecord:
    vm = ctx.lifecycle.get(vm_id, 0)
    if vm.state not in (S.RUNNING, S.STOPPED, S.PENDING):
        raise Conflict(
            f"{vm.name} is {vm.state.value}: snapshots are taken of running or stopped VMs; "
            "wait until it has settled (or stop it) and retry",
            current_state=vm.state.value,
        )
    live = vm.state == S.RUNNING
    snapdir = ctx.lifecycle.paths(vm.id).snapshots
    snapdir.mkdir(parents=True, exist_ok=True)
    check_space(
        snapdir,
        expected_bytes(vm.spec, live),
        ctx.config.margin_mib,
        f"a snapshot of {vm.name}",
    )
    created = ctx.clock()
    sid = new_id(created)
    tmp = snapdir / f"{layout.TMP_PREFIX}{sid}"
    final = snapdir / sid
    tmp.mkdir()
    pause_s: float | None = None
    try:
        (tmp / layout.SPEC).write_text(vm.spec.model_dump_json(indent=2))
        # the lifecycle lock keeps stop/restart/start out while disks and memory are taken
        known: dict[str, FileInfo] = {}
        async with ctx.lifecycle.exclusive(vm.id):
            vm = ctx.lifecycle.get(vm.id, 0)
            vmm = ctx.lifecycle.vmm(vm.id) if vm.state == S.RUNNING else None
            if live and vmm is None:
                raise Conflict(f"{vm.name} changed state ({vm.state.value}); retry")
            if vmm is not None:
                pause_s = await _capture_live(ctx, vm, vmm, tmp, known)
            else:
                await asyncio.to_thread(copy_disks, vm.spec, tmp)
        files = await asyncio.to_thread(hash_tree, tmp, known)
        manifest = layout.new_manifest(
            sid, vm, created, kind, tags, protected, vmm is not None, files
        )
        await asyncio.to_thread(layout.seal, tmp, final, manifest)
    except BaseException as exc:
        await asyncio.to_thread(shutil.rmtree, tmp, True)
        if isinstance(exc, DriverError | OSError):
            ctx.events.publish(
                EventType.SNAPSHOT_FAILED,
                f"{vm.name}: snapshot failed: {exc}",
                vm.id,
                error=str(exc),
            )
            raise SnapshotFailed(f"snapshot of {vm.name} failed: {exc}") from exc
        raise
    record = SnapshotRecord(
        id=sid,
        vm_id=vm.id,
        vm_name=vm.name,
        created=created,
        kind=kind,
        tags=tuple(tags),
        protected=protected,
        with_memory=vmm is not None,
        size_bytes=await asyncio.to_thread(dir_size, final),
        path=str(final),
        pause_s=pause_s,
    )
    ctx.store.insert(record)
    ctx.events.publish(
        EventType.SNAPSHOT_CREATED,
        f"{vm.name}: snapshot {sid} ({kind}, {format_size(record.size_bytes)}) created",
        vm.id,
        snapshot=sid,
        kind=kind,
        size_bytes=record.size_bytes,
        pause_s=pause_s,
    )
    return record


async def _capture_live(
    ctx: SnapshotContext, vm: VM, vmm: VMM, tmp: Path, known: dict[str, FileInfo]
) -> float:
    """Pause, save memory, copy disks, resume: all of it from one instant. The memory
    file is hashed while it is written; the hash's tail is finished after the resume."""
    memory = tmp / layout.MEMORY
    hasher = GrowingFileHasher(memory).start()
    began = time.monotonic()
    try:
        await vmm.pause()
        try:
            await vmm.save_state(memory)
            await asyncio.to_thread(copy_disks, vm.spec, tmp)
        finally:
            try:
                await vmm.resume()
            except DriverError as exc:
                ctx.events.publish(
                    EventType.SNAPSHOT_RESUME_FAILED,
                    f"{vm.name}: could not resume after snapshot: {exc}",
                    vm.id,
                )
                raise
        paused = time.monotonic() - began
    except BaseException:
        with contextlib.suppress(BaseException):
            await asyncio.to_thread(hasher.finish)
        raise
    state = await asyncio.to_thread(hasher.finish)
    if memory.is_file():  # a driver may save a directory instead
        known[layout.MEMORY] = state
    return paused


def copy_disks(spec: VMSpec, tmp: Path) -> None:
    for index, drive in enumerate(spec.drives):
        copy_file(Path(drive.path), tmp / layout.disk_name(index, drive.format))
