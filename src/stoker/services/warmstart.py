"""Warm start: a VM's boot snapshot, taken once it is ready after a cold boot, and every later
start (an operator's, a schedule's, a restart, a recovery) resumed from it instead of booting.

The boot snapshot lives in the VM's directory (``warm/``: the saved state and ``boot.json``)
but is not one of its snapshots: no retention rule counts it, and it is replaced when what
decides a boot changes (``domain/bootkey.py``). It is written into ``warm.tmp`` and renamed
into place with its checksum last, so an agent killed meanwhile leaves a whole one or none.
A boot snapshot that no longer matches, fails its checksum, or does not come up in time is
discarded with an event and the start falls back to a cold boot: warm start never leaves a
VM in error that a cold boot would have started.

Disks: the saved state holds memory and devices, not disk contents, and a disk the guest
wrote after the snapshot would no longer match the memory that caches it. So warm start is
refused (422) for a VM with a writable drive; read-only drives are part of the key.

After any resume from saved state the guest is told the time through its guest agent
(``guest-set-time``): its clock stopped when the state was saved.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from stoker.domain.bootkey import BootInputs, boot_inputs, changed
from stoker.domain.events import EventType
from stoker.domain.spec import VMSpec
from stoker.domain.units import format_size
from stoker.domain.vm import VM
from stoker.drivers.base import VMM, DriverError, Unsupported
from stoker.services.directory import VMDirectory
from stoker.services.errors import InvalidSpec
from stoker.services.events import EventBus
from stoker.services.interrupted import resume_interrupted

log = logging.getLogger("stoker.warmstart")

WARM_DIR = "warm"
STATE_FILE = "state"
META_FILE = "boot.json"


class WarmStartConfig(BaseModel):
    """``[warm_start]``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    default: bool = Field(
        default=False, description="warm start for every VM whose spec does not say"
    )
    restore_timeout_s: float = Field(
        default=10.0, gt=0, le=300, description="a warm start not running by then is cold"
    )
    clock_timeout_s: float = Field(default=2.0, gt=0, le=60)


@dataclass(frozen=True)
class BootSnapshot:
    """A complete boot snapshot on disk."""

    state: Path
    key: str
    inputs: dict[str, Any]
    size_bytes: int
    crc32: int
    created_at: datetime


class ContentIds:
    """sha256 of a file's contents, recomputed only when its identity on disk changes (a
    ctime moves with every write or metadata change, and nobody can set it back)."""

    def __init__(self) -> None:
        self._known: dict[str, tuple[tuple[int, ...], str]] = {}

    def of(self, path: str) -> str:
        st = os.stat(path)
        ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        hit = self._known.get(path)
        if hit is not None and hit[0] == ident:
            return hit[1]
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        value = digest.hexdigest()
        self._known[path] = (ident, value)
        return value


class WarmStarts:
    """For the lifecycle: whether a start can resume, and the capture at the ready point."""

    def __init__(
        self,
        directory: VMDirectory,
        events: EventBus,
        config: WarmStartConfig,
        hypervisor_version: Callable[[VMSpec], str],
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.directory = directory
        self.events = events
        self.config = config
        self.hypervisor_version = hypervisor_version
        self.clock = clock or (lambda: datetime.now(UTC))
        self.contents = ContentIds()
        #: VMs an agent crash left with a half-written boot snapshot (and a paused guest)
        self.interrupted: set[str] = set()

    # ---------------------------------------------------------------------- rules

    @property
    def restore_timeout_s(self) -> float:
        return self.config.restore_timeout_s

    def enabled(self, spec: VMSpec) -> bool:
        return self.config.default if spec.warm_start is None else spec.warm_start

    def check_create(self, spec: VMSpec) -> None:
        """A create check: a writable drive and warm start do not go together."""
        if not self.enabled(spec):
            return
        for index, drive in enumerate(spec.drives):
            if not drive.read_only:
                raise InvalidSpec(
                    f"drives[{index}].read_only",
                    "warm start resumes memory saved at the first boot, which would not match "
                    "a disk the guest wrote since: make the drive read_only, or turn "
                    "warm_start off for this VM",
                )

    def inputs(self, vm: VM) -> BootInputs:
        spec = vm.spec
        paths = [
            spec.kernel,
            *([spec.initrd] if spec.initrd else []),
            *(d.path for d in spec.drives),
        ]
        contents = {p: self.contents.of(p) for p in paths}
        return boot_inputs(
            spec,
            contents=contents,
            mac=spec.network.mac,
            hypervisor_version=self.hypervisor_version(spec),
        )

    # ---------------------------------------------------------------------- the store

    def _dir(self, vm_id: str) -> Path:
        return self.directory.paths(vm_id).root / WARM_DIR

    def current(self, vm_id: str) -> BootSnapshot | None:
        """The boot snapshot on disk, complete (its ``boot.json`` is written last), or None."""
        meta_path = self._dir(vm_id) / META_FILE
        try:
            meta = json.loads(meta_path.read_text())
            state = self._dir(vm_id) / STATE_FILE
            return BootSnapshot(
                state=state,
                key=str(meta["key"]),
                inputs=dict(meta["inputs"]),
                size_bytes=int(meta["size_bytes"]),
                crc32=int(meta["crc32"]),
                created_at=datetime.fromisoformat(meta["created_at"]),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def discard(self, vm: VM, why: str) -> None:
        """Remove the boot snapshot and say why (the next start boots cold)."""
        shutil.rmtree(self._dir(vm.id), ignore_errors=True)
        self.events.publish(
            EventType.VM_BOOT_SNAPSHOT_DISCARDED,
            f"{vm.name}: boot snapshot discarded: {why}",
            vm.id,
            reason=why,
        )

    # ---------------------------------------------------------------------- start

    async def warm_state(self, vm: VM) -> BootSnapshot | None:
        """The boot snapshot a start of ``vm`` should resume, if its key still matches what
        the VM boots from; None (and a discarded snapshot, with the reason) when not. Its
        checksum is :meth:`verify`'s, run while the hypervisor loads it."""
        if not self.enabled(vm.spec):
            return None
        snapshot = self.current(vm.id)
        if snapshot is None:
            return None
        inputs = await asyncio.to_thread(self.inputs, vm)
        if inputs.key != snapshot.key:
            what = ", ".join(changed(snapshot.inputs, dict(inputs.fields)))
            self.discard(vm, f"what the VM boots from changed ({what}); starting cold")
            return None
        return snapshot

    async def verify(self, vm: VM, snapshot: BootSnapshot) -> bool:
        """Whether the saved state still has the checksum it was sealed with; a damaged one
        is discarded with the reason."""
        crc = await asyncio.to_thread(_crc32, snapshot.state)
        if crc != snapshot.crc32:
            self.discard(vm, "its saved state fails its checksum; starting cold")
            return False
        return True

    def failed(self, vm: VM, why: str) -> None:
        """The warm start did not work: discard, so the cold boot that follows makes a new
        one at its ready point."""
        self.discard(vm, f"the warm start failed ({why}); starting cold")

    # ---------------------------------------------------------------------- ready point

    async def guest_ready(self, vm: VM, vmm: VMM, restored: bool) -> None:
        """A guest is ready: tell a resumed one the time; snapshot a cold-booted one."""
        if restored:
            await self._tell_time(vm, vmm)
        elif self.enabled(vm.spec):
            await self._capture(vm, vmm)

    async def _tell_time(self, vm: VM, vmm: VMM) -> None:
        try:
            await vmm.sync_guest_clock(self.clock(), self.config.clock_timeout_s)
        except (DriverError, Unsupported) as exc:
            owned = self.directory.owned(vm.id)
            if owned is None or owned.vmm is not vmm:
                return  # stopped meanwhile: nothing left to tell
            self.events.publish(
                EventType.VM_GUEST_CLOCK,
                f"{vm.name}: could not set the resumed guest's clock: {exc}",
                vm.id,
                error=str(exc),
            )

    async def _capture(self, vm: VM, vmm: VMM) -> None:
        """Pause, save, resume; then seal the files (checksum, fsync, rename) while the guest
        runs on. Runs under the lifecycle's per-VM lock (from its ready path)."""
        inputs = await asyncio.to_thread(self.inputs, vm)
        existing = self.current(vm.id)
        if existing is not None and existing.key == inputs.key:
            return
        final = self._dir(vm.id)
        tmp = final.with_name(WARM_DIR + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        state = tmp / STATE_FILE
        began = asyncio.get_running_loop().time()
        try:
            await vmm.pause()
            try:
                await vmm.save_state(state)
            finally:
                await vmm.resume()
            paused = asyncio.get_running_loop().time() - began
            snapshot = await asyncio.to_thread(_seal, tmp, final, inputs, self.clock())
        except (DriverError, Unsupported, OSError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            log.warning("boot snapshot of %s failed: %s", vm.name, exc)
            self.events.publish(
                EventType.VM_BOOT_SNAPSHOT_DISCARDED,
                f"{vm.name}: taking the boot snapshot failed: {exc}",
                vm.id,
                reason=str(exc),
            )
            return
        self.events.publish(
            EventType.VM_BOOT_SNAPSHOT_SAVED,
            f"{vm.name}: boot snapshot saved ({format_size(snapshot.size_bytes)}, guest paused "
            f"{paused * 1000:.0f} ms)",
            vm.id,
            size_bytes=snapshot.size_bytes,
            pause_s=round(paused, 4),
            key=snapshot.key,
        )

    def info(self, vm_id: str) -> BootSnapshot | None:
        return self.current(vm_id)

    # ---------------------------------------------------------------------- crashes

    def cleanup_leftovers(self) -> None:
        """At agent start: what a crash mid-capture left. A half-written boot snapshot is
        removed (a whole one was renamed into place before its VM went on); its VM, left
        paused, is resumed once re-adopted (``vmm_up``)."""
        for vm in self.directory.all():
            root = self.directory.paths(vm.id).root
            for leftover in (WARM_DIR + ".tmp", WARM_DIR + ".old"):
                path = root / leftover
                if path.exists():
                    shutil.rmtree(path, ignore_errors=True)
                    if leftover.endswith(".tmp"):
                        self.interrupted.add(vm.id)

    async def vmm_up(self, vm: VM, vmm: VMM) -> None:
        """A re-adopted VM whose boot snapshot an agent crash interrupted runs again."""
        if vm.id not in self.interrupted:
            return
        self.interrupted.discard(vm.id)
        was = await resume_interrupted(vmm)
        if was is not None:
            self.events.publish(
                EventType.VM_BOOT_SNAPSHOT_DISCARDED,
                f"{vm.name}: resumed after an interrupted boot snapshot (was {was})",
                vm.id,
                reason="interrupted by an agent crash",
            )


def _files(path: Path) -> list[Path]:
    """The saved state's files: QEMU writes one, Firecracker a directory of two."""
    return sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]


def _crc32(path: Path) -> int:
    crc = 0
    for file in _files(path):
        crc = zlib.crc32(file.name.encode(), crc)
        with open(file, "rb") as f:
            while chunk := f.read(4 << 20):
                crc = zlib.crc32(chunk, crc)
    return crc


def _seal(tmp: Path, final: Path, inputs: BootInputs, at: datetime) -> BootSnapshot:
    """Checksum and fsync the state, write ``boot.json`` last, rename into place."""
    state = tmp / STATE_FILE
    crc = _crc32(state)
    size = 0
    for file in _files(state):
        size += file.stat().st_size
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    meta: Mapping[str, Any] = {
        "key": inputs.key,
        "inputs": dict(inputs.fields),
        "size_bytes": size,
        "crc32": crc,
        "created_at": at.isoformat(),
    }
    meta_path = tmp / META_FILE
    fd = os.open(meta_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    old = final.with_name(WARM_DIR + ".old")
    shutil.rmtree(old, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        final.rename(old)
    tmp.rename(final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    shutil.rmtree(old, ignore_errors=True)
    return BootSnapshot(final / STATE_FILE, inputs.key, dict(inputs.fields), size, crc, at)
