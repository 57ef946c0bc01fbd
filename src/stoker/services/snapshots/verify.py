"""Checking a snapshot can still be restored: checksums, qcow2 consistency, and (deep) a
trial run; the verdict is recorded on the snapshot so `list` shows when it was last proven.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from stoker.domain.events import EventType
from stoker.domain.snapshots import SnapshotRecord, VerifyRecord
from stoker.drivers.base import DriverError, Unsupported
from stoker.services.errors import Conflict
from stoker.services.snapshots import layout
from stoker.services.snapshots.checksums import FileInfo, list_files, sha256_file
from stoker.services.snapshots.context import SnapshotContext
from stoker.services.snapshots.deep_verify import deep_verify
from stoker.services.snapshots.files import run_tool


async def verify_snapshot(
    ctx: SnapshotContext, snapshot_id: str, deep: bool = False
) -> SnapshotRecord:
    snap = ctx.get(snapshot_id)
    async with ctx.vm_lock(snap.vm_id):
        snap = ctx.get(snapshot_id)
        began = time.monotonic()
        problems, notes = await _check_files(snap)
        if deep and not problems:
            try:
                notes.append(await deep_verify(ctx, snap))
            except (DriverError, Unsupported, OSError, TimeoutError) as exc:
                problems.append(f"deep verify: {exc or type(exc).__name__}")
        duration = time.monotonic() - began
        ok = not problems
        detail = "; ".join(problems or notes)
        ctx.store.set_verified(
            snap.id, VerifyRecord(ctx.clock(), ok, deep, detail, round(duration, 3))
        )
    ctx.events.publish(
        EventType.SNAPSHOT_VERIFIED if ok else EventType.SNAPSHOT_VERIFY_FAILED,
        f"{snap.vm_name}: snapshot {snap.id} {'verified' if ok else 'FAILED'}"
        f"{' (deep)' if deep else ''}: {detail}",
        snap.vm_id,
        snapshot=snap.id,
        ok=ok,
        deep=deep,
    )
    return ctx.get(snap.id)


async def _check_files(snap: SnapshotRecord) -> tuple[list[str], list[str]]:
    """(problems, notes): every manifest entry against the files, then ``qemu-img check``."""
    root = Path(snap.path)
    try:
        manifest = layout.read_manifest(snap)
    except Conflict as exc:
        return [exc.detail], []
    expected: dict[str, FileInfo] = manifest.get("files", {})
    problems = await asyncio.to_thread(_compare, root, expected)
    notes = [f"{len(expected)} files match their checksums"]
    for disk in manifest.get("disks", []):
        image = root / disk["file"]
        if str(disk["file"]).endswith(".qcow2") and image.is_file():
            done = await asyncio.to_thread(
                run_tool, ["qemu-img", "check", "-f", "qcow2", str(image)]
            )
            if done.returncode != 0:
                problems.append(
                    f"qemu-img check {disk['file']}: "
                    f"{(done.stdout + done.stderr).strip().splitlines()[-1:]}"
                )
            else:
                notes.append(f"qemu-img check {disk['file']}: no errors")
    return problems, notes


def _compare(root: Path, expected: dict[str, FileInfo]) -> list[str]:
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
