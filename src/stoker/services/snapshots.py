"""Snapshots: create, restore, verify, retention and pruning, automatic snapshots.

A snapshot is a directory ``<vm dir>/snapshots/<id>/`` holding ``memory`` (the VMM's saved
state; absent when the VM was not running), ``disks/vd<i>.<fmt>`` (copies of every drive),
``spec.json`` and ``manifest.json`` (size and sha256 of every other file, kind, tags,
protection). It is written as ``.tmp-<id>`` and renamed only when complete and fsynced, so a
crash leaves either a whole snapshot or a ``.tmp-`` leftover that the next agent start
removes. Deletion renames to ``.del-<id>`` first for the same reason.

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
import hashlib
import json
import logging
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stoker.config import AgentConfig, ConfigError
from stoker.domain import retention
from stoker.domain.spec import DriveFormat, Network, NetworkMode, VMSpec
from stoker.domain.states import VMState
from stoker.domain.vm import VM
from stoker.drivers.base import VMM, DriverError, NotSupported, VMPaths
from stoker.host.disk import dir_size, free_bytes
from stoker.host.proc import find_processes_with_arg, kill
from stoker.services.container import Services
from stoker.services.errors import Conflict, InvalidSpec, NotFound, ServiceError
from stoker.services.lifecycle import Lifecycle
from stoker.store.db import Database
from stoker.store.events import Event
from stoker.store.snapshots import PolicyRecord, SnapshotRecord, SnapshotStore, VerifyRecord

log = logging.getLogger("stoker.snapshots")

S = VMState
Kind = Literal["manual", "auto", "pre-update"]
MANIFEST = "manifest.json"
MEMORY = "memory"
MIB = 1024 * 1024


class SnapshotSettings(BaseModel):
    """The ``[snapshots]`` section of the agent config."""

    model_config = ConfigDict(extra="forbid")

    margin_mib: int = Field(
        default=256, ge=0, description="free space to leave beyond a snapshot's expected size"
    )
    timezone: str | None = Field(
        default=None, description="zone for retention periods (default: the host's)"
    )
    tick_s: float = Field(default=30.0, gt=0, description="how often automatic policies are due")
    restore_timeout_s: float = Field(default=120.0, gt=0)
    deep_verify_settle_s: float = Field(
        default=1.0, ge=0, description="how long a deep-verified VM must keep running"
    )
    deep_verify_timeout_s: float = Field(default=120.0, gt=0)
    test_delay_s: float = Field(
        default=0.0, ge=0, description="test hook: sleep after saving memory, VM still paused"
    )


# ------------------------------------------------------------------------------ errors


class InsufficientSpace(Conflict):
    title = "Not enough disk space"


class SnapshotFailed(Conflict):
    title = "Snapshot failed"


class RestoreFailed(Conflict):
    title = "Restore failed"


# ------------------------------------------------------------------------- result types


@dataclass(frozen=True)
class PruneItem:
    id: str
    created: datetime
    reasons: tuple[str, ...]
    size_bytes: int


@dataclass(frozen=True)
class PruneResult:
    vm_id: str
    vm_name: str
    policy: str
    timezone: str
    dry_run: bool
    keep: tuple[PruneItem, ...]
    remove: tuple[PruneItem, ...]
    freed_bytes: int


@dataclass(frozen=True)
class AutoResult:
    snapshot: SnapshotRecord
    prune: PruneResult | None


@dataclass(frozen=True)
class Policy:
    vm_id: str
    vm_name: str
    retention: str | None
    interval: str | None
    timezone: str
    last_auto_at: datetime | None
    next_auto_at: datetime | None


# ------------------------------------------------------------------ blocking file helpers


def _fsync_path(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_file(src: Path, dst: Path) -> None:
    """Copy an image, sharing blocks where the file system can and keeping holes."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["cp", "--reflink=auto", "--sparse=always", "--", str(src), str(dst)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise OSError(f"copying {src} failed: {done.stderr.strip() or done.returncode}")


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def list_files(root: Path) -> list[str]:
    """Every regular file under ``root`` except the manifest, as sorted relative paths."""
    found = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel != MANIFEST:
                found.append(rel)
    return sorted(found)


def hash_tree(
    root: Path, known: dict[str, dict[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file under ``root`` (hashlib drops the GIL, so threads help);
    ``known`` holds files already hashed while they were written."""
    from concurrent.futures import ThreadPoolExecutor

    known = known or {}
    names = [n for n in list_files(root) if n not in known]
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        digests = list(pool.map(lambda n: sha256_file(root / n), names))
    result = {
        n: {"size": (root / n).stat().st_size, "sha256": d}
        for n, d in zip(names, digests, strict=True)
    }
    for name, info in known.items():
        if (root / name).stat().st_size != info["size"]:
            raise OSError(f"{name} changed after it was hashed")
        result[name] = info
    return dict(sorted(result.items()))


class GrowingFileHasher:
    """Hashes a file while the VMM writes it, so the checksum costs (almost) no extra time;
    it also flushes what it has read to disk as it goes, so the final fsync is short."""

    SYNC_EVERY = 32 * MIB

    def __init__(self, path: Path) -> None:
        self.path = path
        self._done = threading.Event()
        self._result: dict[str, Any] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="snapshot-hash", daemon=True)

    def start(self) -> GrowingFileHasher:
        self._thread.start()
        return self

    def finish(self) -> dict[str, Any]:
        """The writer is done: hash the rest and return ``{"size", "sha256"}``."""
        self._done.set()
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._result is None:
            raise OSError(f"{self.path} was never written")
        return self._result

    def _run(self) -> None:
        try:
            while not self.path.exists():
                if self._done.is_set():
                    return
                time.sleep(0.002)
            digest = hashlib.sha256()
            size = synced = 0
            with open(self.path, "rb") as f:
                while True:
                    done = self._done.is_set()
                    chunk = f.read(4 * MIB)
                    if chunk:
                        digest.update(chunk)
                        size += len(chunk)
                        if size - synced >= self.SYNC_EVERY:
                            os.fdatasync(f.fileno())
                            synced = size
                    elif done:
                        break
                    else:
                        time.sleep(0.002)
            self._result = {"size": size, "sha256": digest.hexdigest()}
        except BaseException as exc:
            self._error = exc


def fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def write_json_durably(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def allocated_bytes(path: Path) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def _disk_name(index: int, fmt: DriveFormat) -> str:
    return f"disks/vd{index}.{'qcow2' if fmt == DriveFormat.QCOW2 else 'raw'}"


def host_timezone() -> tzinfo:
    """The host's zone as a real IANA zone (so DST is known), falling back to UTC."""
    candidates = [os.environ.get("TZ", "").lstrip(":")]
    with contextlib.suppress(OSError):
        candidates.append(Path("/etc/timezone").read_text().strip())
    with contextlib.suppress(OSError):
        target = os.readlink("/etc/localtime")
        if "zoneinfo/" in target:
            candidates.append(target.split("zoneinfo/", 1)[1])
    for name in candidates:
        if name:
            with contextlib.suppress(ZoneInfoNotFoundError, ValueError):
                return ZoneInfo(name)
    return UTC


def _tz_name(tz: tzinfo) -> str:
    return getattr(tz, "key", None) or str(tz)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# ------------------------------------------------------------------------------ service


class SnapshotService:
    def __init__(
        self,
        lifecycle: Lifecycle,
        store: SnapshotStore,
        settings: SnapshotSettings,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.lifecycle = lifecycle
        self.events = lifecycle.events
        self.store = store
        self.settings = settings
        self.clock = clock or (lambda: datetime.now(UTC))
        self.tz: tzinfo = ZoneInfo(settings.timezone) if settings.timezone else host_timezone()
        self._locks: dict[str, asyncio.Lock] = {}
        #: VMs whose snapshot was interrupted by an agent crash: resume them when re-adopted
        self.interrupted: set[str] = set()

    def _vm_lock(self, vm_id: str) -> asyncio.Lock:
        """Serialises snapshot work on one VM (create, restore, delete, prune, verify)."""
        return self._locks.setdefault(vm_id, asyncio.Lock())

    # ---------------------------------------------------------------------------- queries

    def get(self, snapshot_id: str) -> SnapshotRecord:
        snap = self.store.get(snapshot_id)
        if snap is None:
            raise NotFound(f"no snapshot with id {snapshot_id!r} (see `stoker snapshot list`)")
        return snap

    def list(self, vm_ref: str | None = None) -> list[SnapshotRecord]:
        if vm_ref is None:
            return self.store.list()
        return self.store.list(self.lifecycle.get(vm_ref, 0).id)

    def manifest(self, snap: SnapshotRecord) -> dict[str, Any]:
        try:
            return dict(json.loads((Path(snap.path) / MANIFEST).read_text()))
        except (OSError, ValueError) as exc:
            raise Conflict(
                f"snapshot {snap.id} is damaged: its manifest cannot be read ({exc}); delete it"
            ) from None

    # ---------------------------------------------------------------------------- create

    def expected_bytes(self, spec: VMSpec, with_memory: bool) -> int:
        """What a snapshot will take: guest RAM (an upper bound of the state file) + disks."""
        disks = sum(allocated_bytes(Path(d.path)) for d in spec.drives)
        return (spec.memory_mib * MIB if with_memory else 0) + disks

    def _check_space(self, where: Path, needed: int, what: str) -> None:
        margin = self.settings.margin_mib * MIB
        free = free_bytes(where)
        if free < needed + margin:
            raise InsufficientSpace(
                f"not enough free disk space for {what}: it needs about {_human(needed)} plus "
                f"a margin of {_human(margin)}, but only {_human(free)} is free on {where}; "
                "free space (for example `stoker snapshot prune`) or lower snapshots.margin_mib",
                needed_bytes=needed,
                margin_bytes=margin,
                free_bytes=free,
            )

    def _new_id(self, at: datetime) -> str:
        return f"{at:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"

    async def create(
        self,
        vm_ref: str,
        kind: Kind = "manual",
        tags: tuple[str, ...] = (),
        protected: bool | None = None,
    ) -> SnapshotRecord:
        """Take a snapshot; pre-update snapshots are protected until released."""
        vm = self.lifecycle.get(vm_ref, 0)
        if protected is None:
            protected = kind == "pre-update"
        async with self._vm_lock(vm.id):
            return await self._create_locked(vm.id, kind, tags, protected)

    async def _create_locked(
        self, vm_id: str, kind: Kind, tags: tuple[str, ...], protected: bool
    ) -> SnapshotRecord:
        vm = self.lifecycle.get(vm_id, 0)
        if vm.state not in (S.RUNNING, S.STOPPED, S.PENDING):
            raise Conflict(
                f"{vm.name} is {vm.state.value}: snapshots are taken of running or stopped VMs; "
                "wait until it has settled (or stop it) and retry",
                current_state=vm.state.value,
            )
        live = vm.state == S.RUNNING
        paths = self.lifecycle.paths(vm.id)
        snapdir = paths.snapshots
        snapdir.mkdir(parents=True, exist_ok=True)
        self._check_space(snapdir, self.expected_bytes(vm.spec, live), f"a snapshot of {vm.name}")
        created = self.clock()
        sid = self._new_id(created)
        tmp = snapdir / f".tmp-{sid}"
        final = snapdir / sid
        tmp.mkdir()
        pause_s: float | None = None
        try:
            (tmp / "spec.json").write_text(vm.spec.model_dump_json(indent=2))
            # the lifecycle lock keeps stop/restart/start out while disks and memory are taken
            known: dict[str, dict[str, Any]] = {}
            async with self.lifecycle.exclusive(vm.id):
                vm = self.lifecycle.get(vm.id, 0)
                vmm = self.lifecycle.vmm(vm.id) if vm.state == S.RUNNING else None
                if live and vmm is None:
                    raise Conflict(f"{vm.name} changed state ({vm.state.value}); retry")
                if vmm is not None:
                    pause_s = await self._capture_live(vm, vmm, tmp, known)
                else:
                    await asyncio.to_thread(self._copy_disks, vm.spec, tmp)
            files = await asyncio.to_thread(hash_tree, tmp, known)
            manifest = {
                "format": 1,
                "id": sid,
                "vm_id": vm.id,
                "vm_name": vm.name,
                "created": created.astimezone(UTC).isoformat(),
                "kind": kind,
                "tags": list(tags),
                "protected": protected,
                "with_memory": vmm is not None,
                "hypervisor": vm.spec.hypervisor.value,
                "disks": [
                    {"index": i, "file": _disk_name(i, d.format), "source": d.path}
                    for i, d in enumerate(vm.spec.drives)
                ],
                "files": files,
            }
            await asyncio.to_thread(self._seal, tmp, final, manifest)
        except BaseException as exc:
            await asyncio.to_thread(shutil.rmtree, tmp, True)
            if isinstance(exc, DriverError | OSError):
                self.events.publish(
                    "snapshot.failed", f"{vm.name}: snapshot failed: {exc}", vm.id, error=str(exc)
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
        self.store.insert(record)
        self.events.publish(
            "snapshot.created",
            f"{vm.name}: snapshot {sid} ({kind}, {_human(record.size_bytes)}) created",
            vm.id,
            snapshot=sid,
            kind=kind,
            size_bytes=record.size_bytes,
            pause_s=pause_s,
        )
        return record

    async def _capture_live(
        self, vm: VM, vmm: VMM, tmp: Path, known: dict[str, dict[str, Any]]
    ) -> float:
        """Pause, save memory, copy disks, resume: all of it from one instant. The memory
        file is hashed while it is written; the hash's tail is finished after the resume."""
        hasher = GrowingFileHasher(tmp / MEMORY).start()
        began = time.monotonic()
        try:
            await vmm.pause()
            try:
                await vmm.save_state(tmp / MEMORY)
                if self.settings.test_delay_s:
                    await asyncio.sleep(self.settings.test_delay_s)
                await asyncio.to_thread(self._copy_disks, vm.spec, tmp)
            finally:
                try:
                    await vmm.resume()
                except DriverError as exc:
                    self.events.publish(
                        "snapshot.resume_failed",
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
        if (tmp / MEMORY).is_file():  # a driver may save a directory instead
            known[MEMORY] = state
        return paused

    @staticmethod
    def _copy_disks(spec: VMSpec, tmp: Path) -> None:
        for index, drive in enumerate(spec.drives):
            copy_file(Path(drive.path), tmp / _disk_name(index, drive.format))

    @staticmethod
    def _seal(tmp: Path, final: Path, manifest: dict[str, Any]) -> None:
        """Make the snapshot durable, then visible: fsync everything, then one rename."""
        write_json_durably(tmp / MANIFEST, manifest)
        fsync_tree(tmp)
        os.rename(tmp, final)
        _fsync_path(final.parent)

    # --------------------------------------------------------------------------- restore

    async def restore(self, snapshot_id: str) -> tuple[SnapshotRecord, VM]:
        """Stop the VM, put its disks back, and resume it from the saved memory."""
        snap = self.get(snapshot_id)
        async with self._vm_lock(snap.vm_id):
            snap = self.get(snapshot_id)
            vm = self.lifecycle.get(snap.vm_id, 0)
            root = Path(snap.path)
            manifest = self.manifest(snap)
            self._quick_check(snap, manifest)
            then = VMSpec.model_validate_json((root / "spec.json").read_text())
            self._check_compatible(vm, then, snap)
            for index, drive in enumerate(vm.spec.drives):
                src = root / _disk_name(index, drive.format)
                self._check_space(
                    Path(drive.path).parent, allocated_bytes(src), f"restoring {drive.path}"
                )
            reason = f"restoring snapshot {snap.id}"
            if vm.state not in (S.STOPPED, S.PENDING):
                vm = await self.lifecycle.stop(vm.id, graceful=False, reason=reason)
            async with self.lifecycle.exclusive(vm.id):
                await asyncio.to_thread(self._put_disks_back, vm.spec, root, snap.id)
            if snap.with_memory:
                await self.lifecycle.start(
                    vm.id, reason=f"restored from snapshot {snap.id}", restore_from=root / MEMORY
                )
                vm = await self.lifecycle.wait_settled(vm.id, self.settings.restore_timeout_s)
                if vm.state != S.RUNNING:
                    self.events.publish(
                        "snapshot.restore_failed",
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
            vm = self.lifecycle.get(vm.id)
            self.events.publish(
                "snapshot.restored",
                f"{vm.name}: restored from snapshot {snap.id}; now {vm.state.value}",
                vm.id,
                snapshot=snap.id,
            )
            return snap, vm

    def _quick_check(self, snap: SnapshotRecord, manifest: dict[str, Any]) -> None:
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

    @staticmethod
    def _check_compatible(vm: VM, then: VMSpec, snap: SnapshotRecord) -> None:
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

    @staticmethod
    def _put_disks_back(spec: VMSpec, root: Path, sid: str) -> None:
        """Each disk: copy beside the original, fsync, rename over it (never half a disk)."""
        for index, drive in enumerate(spec.drives):
            target = Path(drive.path)
            tmp = target.with_name(f".{target.name}.stoker-restore-{sid}")
            try:
                copy_file(root / _disk_name(index, drive.format), tmp)
                _fsync_path(tmp)
                os.replace(tmp, target)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            _fsync_path(target.parent)

    # ---------------------------------------------------------------------------- delete

    async def delete(self, snapshot_id: str, force: bool = False) -> int:
        snap = self.get(snapshot_id)
        if snap.protected and not force:
            what = "a pre-update snapshot" if snap.kind == "pre-update" else "protected"
            raise Conflict(
                f"snapshot {snap.id} is {what}: release it first "
                f"(`stoker snapshot unprotect {snap.id}`) or delete with force"
            )
        async with self._vm_lock(snap.vm_id):
            freed = await self._remove(self.get(snapshot_id))
        self.events.publish(
            "snapshot.deleted",
            f"{snap.vm_name}: snapshot {snap.id} deleted, {_human(freed)} freed",
            snap.vm_id,
            snapshot=snap.id,
            freed_bytes=freed,
        )
        return freed

    async def _remove(self, snap: SnapshotRecord) -> int:
        """Hide the directory with one rename, drop the row, then free the space."""
        final = Path(snap.path)
        dead = final.with_name(f".del-{snap.id}")
        size = 0
        if final.exists():
            size = await asyncio.to_thread(dir_size, final)
            os.rename(final, dead)
            _fsync_path(final.parent)
        self.store.delete(snap.id)
        await asyncio.to_thread(shutil.rmtree, dead, True)
        return size

    # ------------------------------------------------------------------------ protection

    def set_protected(self, snapshot_id: str, protected: bool) -> SnapshotRecord:
        snap = self.get(snapshot_id)
        manifest_path = Path(snap.path) / MANIFEST
        manifest = self.manifest(snap)
        manifest["protected"] = protected
        write_json_durably(manifest_path, manifest)
        self.store.set_protected(snap.id, protected)
        word = "protected" if protected else "released"
        self.events.publish(
            f"snapshot.{'protected' if protected else 'unprotected'}",
            f"{snap.vm_name}: snapshot {snap.id} {word}",
            snap.vm_id,
            snapshot=snap.id,
        )
        return self.get(snap.id)

    # ---------------------------------------------------------------------------- verify

    async def verify(self, snapshot_id: str, deep: bool = False) -> SnapshotRecord:
        snap = self.get(snapshot_id)
        async with self._vm_lock(snap.vm_id):
            snap = self.get(snapshot_id)
            began = time.monotonic()
            problems, notes = await self._check_files(snap)
            if deep and not problems:
                try:
                    notes.append(await self._deep_verify(snap))
                except (DriverError, NotSupported, OSError, TimeoutError) as exc:
                    problems.append(f"deep verify: {exc or type(exc).__name__}")
            duration = time.monotonic() - began
            ok = not problems
            detail = "; ".join(problems or notes)
            self.store.set_verified(
                snap.id, VerifyRecord(self.clock(), ok, deep, detail, round(duration, 3))
            )
        self.events.publish(
            "snapshot.verified" if ok else "snapshot.verify_failed",
            f"{snap.vm_name}: snapshot {snap.id} {'verified' if ok else 'FAILED'}"
            f"{' (deep)' if deep else ''}: {detail}",
            snap.vm_id,
            snapshot=snap.id,
            ok=ok,
            deep=deep,
        )
        return self.get(snap.id)

    async def _check_files(self, snap: SnapshotRecord) -> tuple[list[str], list[str]]:
        root = Path(snap.path)
        try:
            manifest = self.manifest(snap)
        except Conflict as exc:
            return [exc.detail], []
        expected: dict[str, dict[str, Any]] = manifest.get("files", {})

        def compare() -> list[str]:
            found: list[str] = []
            for name, info in expected.items():
                path = root / name
                if not path.is_file():
                    found.append(f"{name} is missing")
                elif path.stat().st_size != info["size"]:
                    found.append(f"{name} size {path.stat().st_size} != {info['size']}")
                elif sha256_file(path) != info["sha256"]:
                    found.append(f"{name} checksum mismatch")
            extra = sorted(set(list_files(root)) - set(expected))
            found += [f"{name} is not in the manifest" for name in extra]
            return found

        problems = await asyncio.to_thread(compare)
        notes = [f"{len(expected)} files match their checksums"]
        for disk in manifest.get("disks", []):
            if str(disk["file"]).endswith(".qcow2") and (root / disk["file"]).is_file():
                done = await asyncio.to_thread(
                    subprocess.run,
                    ["qemu-img", "check", "-f", "qcow2", str(root / disk["file"])],
                    capture_output=True,
                    text=True,
                )
                if done.returncode != 0:
                    problems.append(
                        f"qemu-img check {disk['file']}: "
                        f"{(done.stdout + done.stderr).strip().splitlines()[-1:]}"
                    )
                else:
                    notes.append(f"qemu-img check {disk['file']}: no errors")
        return problems, notes

    async def _deep_verify(self, snap: SnapshotRecord) -> str:
        """Run the snapshot in a throwaway VMM: own directory, overlays on the snapshot's
        disks (opened read-only as backing files), no port forwards or TAP; then kill it."""
        root = Path(snap.path)
        spec = VMSpec.model_validate_json((root / "spec.json").read_text())
        driver = self.lifecycle.driver_for(spec)
        work = Path(tempfile.mkdtemp(prefix=".verify-", dir=root.parent))
        vmm: VMM | None = None
        began = time.monotonic()
        try:
            drives = []
            for index, drive in enumerate(spec.drives):
                overlay = work / f"vd{index}.qcow2"
                backing = root / _disk_name(index, drive.format)
                fmt = "qcow2" if drive.format == DriveFormat.QCOW2 else "raw"
                argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b", str(backing)]
                done = await asyncio.to_thread(
                    subprocess.run,
                    [*argv, str(overlay)],
                    capture_output=True,
                    text=True,
                )
                if done.returncode != 0:
                    raise OSError(f"qemu-img create overlay failed: {done.stderr.strip()}")
                drives.append(drive.model_copy(update={"path": str(overlay), "format": "qcow2"}))
            net = spec.network
            if net.mode != NetworkMode.NONE:
                net = Network(mode=NetworkMode.USER, mac=net.mac)
            throwaway = spec.model_copy(update={"drives": drives, "network": net})
            paths = VMPaths(work)
            timeout = self.settings.deep_verify_timeout_s
            async with asyncio.timeout(timeout):
                if snap.with_memory:
                    vmm = await self._restore_throwaway(
                        driver, f"verify-{snap.id}", throwaway, paths, root / MEMORY
                    )
                    ready = time.monotonic() - began
                    await self._stays_running(vmm, self.settings.deep_verify_settle_s)
                    return (
                        f"throwaway VM resumed from memory in {ready:.2f} s and kept running "
                        f"for {self.settings.deep_verify_settle_s:g} s"
                    )
                vmm = await driver.spawn(f"verify-{snap.id}", throwaway, paths)
                await vmm.wait_ready(min(throwaway.boot_timeout_s, timeout))
                took = time.monotonic() - began
                return f"throwaway VM booted from the disks to ready in {took:.2f} s"
        finally:
            if vmm is not None:
                await vmm.kill()
                child = getattr(vmm, "child", None)
                if child is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.to_thread(child.wait, 10)
                await vmm.close()
            await asyncio.to_thread(shutil.rmtree, work, True)

    async def _restore_throwaway(
        self, driver: Any, throwaway_id: str, spec: VMSpec, paths: VMPaths, memory: Path
    ) -> VMM:
        vmm: VMM = await driver.restore(throwaway_id, spec, paths, memory)
        return vmm

    @staticmethod
    async def _stays_running(vmm: VMM, settle_s: float) -> None:
        deadline = time.monotonic() + settle_s
        while True:
            status = await vmm.status(2.0)
            if not status.running:
                raise DriverError(f"the restored throwaway VM is {status.status}, not running")
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(0.1)

    # ------------------------------------------------------------------- policy and prune

    def get_policy(self, vm_ref: str) -> Policy:
        vm = self.lifecycle.get(vm_ref, 0)
        return self._policy_of(vm, self.store.get_policy(vm.id))

    def _policy_of(self, vm: VM, rec: PolicyRecord | None) -> Policy:
        interval = None
        next_at = None
        if rec is not None and rec.interval_s:
            step = timedelta(seconds=rec.interval_s)
            interval = retention.format_duration(step)
            next_at = (rec.last_auto_at or rec.updated_at) + step
        return Policy(
            vm_id=vm.id,
            vm_name=vm.name,
            retention=rec.retention if rec else None,
            interval=interval,
            timezone=_tz_name(self.tz),
            last_auto_at=rec.last_auto_at if rec else None,
            next_auto_at=next_at,
        )

    def set_policy(self, vm_ref: str, retention_text: str | None, interval: str | None) -> Policy:
        vm = self.lifecycle.get(vm_ref, 0)
        canonical = None
        if retention_text is not None and retention_text.strip():
            try:
                canonical = str(retention.parse_policy(retention_text))
            except ValueError as exc:
                raise InvalidSpec("retention", str(exc)) from None
        interval_s = None
        if interval is not None and interval.strip():
            try:
                step = retention.parse_duration(interval)
            except ValueError as exc:
                raise InvalidSpec("interval", str(exc)) from None
            if step < timedelta(minutes=1):
                raise InvalidSpec("interval", "must be at least 1m")
            interval_s = int(step.total_seconds())
        self.store.put_policy(vm.id, canonical, interval_s, self.clock())
        policy = self.get_policy(vm.id)
        self.events.publish(
            "snapshot.policy",
            f"{vm.name}: snapshot policy set: retention {canonical or 'none'}, "
            f"automatic every {policy.interval or 'never'}",
            vm.id,
            retention=canonical,
            interval=policy.interval,
        )
        return policy

    async def prune(self, vm_ref: str, dry_run: bool = False) -> PruneResult:
        """Apply the VM's retention policy; protected and pre-update snapshots always stay."""
        vm = self.lifecycle.get(vm_ref, 0)
        rec = self.store.get_policy(vm.id)
        if rec is None or not rec.retention:
            raise Conflict(
                f"{vm.name} has no retention policy: set one first, for example "
                f'`stoker snapshot set-policy {vm.name} "daily:7,weekly:4"`'
            )
        async with self._vm_lock(vm.id):
            snaps = {s.id: s for s in self.store.list(vm.id)}
            decided = retention.plan(snaps.values(), rec.retention, self.tz)
            keep = tuple(
                PruneItem(k.id, k.created, k.reasons, snaps[k.id].size_bytes) for k in decided.keep
            )
            why = f"not kept by any rule of {rec.retention}"
            remove = tuple(
                PruneItem(i, snaps[i].created, (why,), snaps[i].size_bytes) for i in decided.remove
            )
            freed = 0
            if not dry_run:
                for item in remove:
                    size = await self._remove(snaps[item.id])
                    freed += size
                    self.events.publish(
                        "snapshot.pruned",
                        f"{vm.name}: snapshot {item.id} pruned ({why}), {_human(size)} freed",
                        vm.id,
                        snapshot=item.id,
                        created=item.created.isoformat(),
                        reason=why,
                        freed_bytes=size,
                    )
        return PruneResult(
            vm_id=vm.id,
            vm_name=vm.name,
            policy=rec.retention,
            timezone=_tz_name(self.tz),
            dry_run=dry_run,
            keep=keep,
            remove=remove,
            freed_bytes=freed if not dry_run else sum(i.size_bytes for i in remove),
        )

    async def auto_snapshot(self, vm_ref: str) -> AutoResult:
        """An automatic snapshot now, then pruning by the VM's policy (the scheduler calls
        this; so does the built-in timer until a scheduler takes over)."""
        vm = self.lifecycle.get(vm_ref, 0)
        rec = self.store.get_policy(vm.id)
        if rec is not None:
            self.store.set_last_auto(vm.id, self.clock())
        snap = await self.create(vm.id, kind="auto")
        pruned = None
        if rec is not None and rec.retention:
            pruned = await self.prune(vm.id)
        return AutoResult(snap, pruned)

    async def run_due(self) -> None:
        """One tick of the built-in timer: auto-snapshot every running VM that is due."""
        now = self.clock()
        for rec in self.store.policies():
            if not rec.interval_s:
                continue
            vm = self.lifecycle.vms.get(rec.vm_id)
            if vm is None:
                self.store.delete_policy(rec.vm_id)
                continue
            due = (rec.last_auto_at or rec.updated_at) + timedelta(seconds=rec.interval_s)
            if now < due or vm.state != S.RUNNING:
                continue
            try:
                await self.auto_snapshot(vm.id)
            except ServiceError as exc:
                self.events.publish(
                    "snapshot.auto_failed",
                    f"{vm.name}: automatic snapshot failed: {exc.detail}",
                    vm.id,
                )

    # ------------------------------------------------------------------ start-up hygiene

    def cleanup_leftovers(self) -> None:
        """Remove what interrupted work left (temp, half-deleted and verify directories,
        half-restored disks), drop rows whose directory is gone, index orphans."""
        rows = {s.id: s for s in self.store.list()}
        for vm in self.lifecycle.vms.list():
            snapdir = self.lifecycle.paths(vm.id).snapshots
            entries = list(snapdir.iterdir()) if snapdir.is_dir() else []
            for entry in entries:
                name = entry.name
                if name.startswith(".tmp-"):
                    shutil.rmtree(entry, ignore_errors=True)
                    self.interrupted.add(vm.id)
                    self.events.publish(
                        "snapshot.cleaned",
                        f"{vm.name}: removed interrupted snapshot {name[5:]}",
                        vm.id,
                        snapshot=name[5:],
                    )
                elif name.startswith(".del-"):
                    shutil.rmtree(entry, ignore_errors=True)
                    if name[5:] in rows:
                        self.store.delete(name[5:])
                        rows.pop(name[5:])
                elif name.startswith(".verify-"):
                    for pid in find_processes_with_arg(str(entry / "control.sock")):
                        kill(pid)
                    shutil.rmtree(entry, ignore_errors=True)
                elif entry.is_dir() and name not in rows:
                    self._adopt(vm, entry)
            for drive in vm.spec.drives:
                target = Path(drive.path)
                for stale in target.parent.glob(f".{target.name}.stoker-restore-*"):
                    stale.unlink(missing_ok=True)
        for snap in rows.values():
            if not Path(snap.path).is_dir():
                self.store.delete(snap.id)
                self.events.publish(
                    "snapshot.lost",
                    f"{snap.vm_name}: snapshot {snap.id} is gone from disk; dropped from the list",
                    snap.vm_id,
                    snapshot=snap.id,
                )

    def _adopt(self, vm: VM, entry: Path) -> None:
        """A complete snapshot whose row was never written (crash right after the rename)."""
        try:
            m = json.loads((entry / MANIFEST).read_text())
            record = SnapshotRecord(
                id=entry.name,
                vm_id=vm.id,
                vm_name=vm.name,
                created=datetime.fromisoformat(m["created"]),
                kind=m["kind"],
                tags=tuple(m.get("tags", ())),
                protected=bool(m.get("protected")),
                with_memory=bool(m.get("with_memory")),
                size_bytes=dir_size(entry),
                path=str(entry),
            )
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring %s: not a complete snapshot (%s)", entry, exc)
            return
        self.store.insert(record)

    async def resume_interrupted(self, vm: VM, vmm: VMM) -> None:
        """on_vmm_up: a VM paused by a snapshot the agent never finished runs again."""
        if vm.id not in self.interrupted:
            return
        self.interrupted.discard(vm.id)
        execute = getattr(vmm, "execute", None)
        if execute is not None:
            with contextlib.suppress(DriverError):
                info = await execute("query-migrate")
                if info.get("status") in ("setup", "active", "pre-switchover", "device"):
                    await execute("migrate_cancel")
                    for _ in range(100):
                        info = await execute("query-migrate")
                        if info.get("status") not in ("active", "cancelling"):
                            break
                        await asyncio.sleep(0.05)
        status = await vmm.status(2.0)
        if not status.running:
            await vmm.resume()
            self.events.publish(
                "snapshot.resumed",
                f"{vm.name}: resumed after an interrupted snapshot (was {status.status})",
                vm.id,
            )

    async def on_event(self, event: Event) -> None:
        if event.type == "vm.deleted" and event.vm_id:
            for snap in self.store.list(event.vm_id):
                self.store.delete(snap.id)
            self.store.delete_policy(event.vm_id)
            self._locks.pop(event.vm_id, None)


@dataclass
class AutoSnapshotLoop:
    """The built-in timer for automatic snapshots (until the scheduler capability owns it)."""

    service: SnapshotService
    _task: asyncio.Task[None] | None = field(default=None, init=False)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                await self.service.run_due()
            except Exception:
                log.exception("automatic snapshot tick failed")
            await asyncio.sleep(self.service.settings.tick_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def install(services: Services, config: AgentConfig, db: Database) -> None:
    """Register ``services.extra["snapshots"]``, clean leftovers, start the auto timer."""
    try:
        settings = SnapshotSettings.model_validate(config.sections.get("snapshots", {}))
    except ValidationError as exc:
        problems = "; ".join(
            f"snapshots.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"invalid [snapshots] configuration: {problems}") from None
    service = SnapshotService(services.lifecycle, SnapshotStore(db), settings)
    service.cleanup_leftovers()
    services.lifecycle.on_vmm_up.append(service.resume_interrupted)
    services.events.add_listener(service.on_event)
    services.extra["snapshots"] = service
    services.background.append(AutoSnapshotLoop(service))
