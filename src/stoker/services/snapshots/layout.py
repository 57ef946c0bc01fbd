"""Where a snapshot's files live and what its manifest says: the on-disk format.

A snapshot is a directory ``<vm dir>/snapshots/<id>/`` holding ``memory`` (the VMM's saved
state; absent when the VM was not running), ``disks/vd<i>.<fmt>`` (copies of every drive),
``spec.json`` and ``manifest.json`` (size and sha256 of every other file, kind, tags,
protection). It is written as ``.tmp-<id>`` and renamed only when complete and fsynced, so a
crash leaves either a whole snapshot or a ``.tmp-`` leftover that the next agent start
removes. Deletion renames to ``.del-<id>`` first for the same reason. Every name and every
manifest key is spelled here once, so writers, readers and the start-up cleanup agree.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from stoker.domain.snapshots import SnapshotRecord
from stoker.domain.spec import DriveFormat, VMSpec
from stoker.domain.vm import VM
from stoker.host.disk import dir_size
from stoker.services.errors import Conflict
from stoker.services.snapshots.files import fsync_path, fsync_tree, write_json_durably

MANIFEST = "manifest.json"
MEMORY = "memory"
SPEC = "spec.json"
#: directory prefixes of work a crash can interrupt (cleaned at the next agent start)
TMP_PREFIX = ".tmp-"
DEL_PREFIX = ".del-"
VERIFY_PREFIX = ".verify-"
#: under the data dir: snapshots kept when their VM was deleted (``<data_dir>/kept-snapshots/
#: <id>/``), still indexed and restorable into a new VM
KEPT_DIR = "kept-snapshots"


def disk_name(index: int, fmt: DriveFormat) -> str:
    """The copy of drive ``index`` inside a snapshot, e.g. ``disks/vd0.qcow2``."""
    return f"disks/vd{index}.{fmt.value}"


def restore_temp(target: Path, snapshot_id: str) -> Path:
    """Where a restored disk is written before it is renamed over ``target``."""
    return target.with_name(f".{target.name}.stoker-restore-{snapshot_id}")


def restore_leftovers(target: Path) -> list[Path]:
    """Half-restored copies of ``target`` that a crash left beside it."""
    return list(target.parent.glob(f".{target.name}.stoker-restore-*"))


def read_spec(root: Path) -> VMSpec:
    """The VM's spec as it was when the snapshot was taken."""
    return VMSpec.model_validate_json((root / SPEC).read_text())


def read_manifest(snap: SnapshotRecord) -> dict[str, Any]:
    try:
        return dict(json.loads((Path(snap.path) / MANIFEST).read_text()))
    except (OSError, ValueError) as exc:
        raise Conflict(
            f"snapshot {snap.id} is damaged: its manifest cannot be read ({exc}); delete it"
        ) from None


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    write_json_durably(root / MANIFEST, manifest)


def new_manifest(
    snapshot_id: str,
    vm: VM,
    created: datetime,
    kind: str,
    tags: tuple[str, ...],
    protected: bool,
    with_memory: bool,
    files: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    return {
        "format": 1,
        "id": snapshot_id,
        "vm_id": vm.id,
        "vm_name": vm.name,
        "created": created.astimezone(UTC).isoformat(),
        "kind": kind,
        "tags": list(tags),
        "protected": protected,
        "with_memory": with_memory,
        "hypervisor": vm.spec.hypervisor.value,
        "disks": [
            {"index": i, "file": disk_name(i, d.format), "source": d.path}
            for i, d in enumerate(vm.spec.drives)
        ],
        "files": files,
    }


def record_from_manifest(vm: VM | None, root: Path) -> SnapshotRecord:
    """The index row of a complete snapshot directory, rebuilt from its manifest (the VM's
    id and name from the manifest when ``vm`` is None: a kept snapshot of a deleted VM);
    raises ``OSError``, ``ValueError`` or ``KeyError`` when it is not one."""
    m = json.loads((root / MANIFEST).read_text())
    return SnapshotRecord(
        id=root.name,
        vm_id=vm.id if vm is not None else str(m["vm_id"]),
        vm_name=vm.name if vm is not None else str(m["vm_name"]),
        created=datetime.fromisoformat(m["created"]),
        kind=m["kind"],
        tags=tuple(m.get("tags", ())),
        protected=bool(m.get("protected")),
        with_memory=bool(m.get("with_memory")),
        size_bytes=dir_size(root),
        path=str(root),
    )


def seal(tmp: Path, final: Path, manifest: dict[str, Any]) -> None:
    """Make the snapshot durable, then visible: fsync everything, then one rename."""
    write_manifest(tmp, manifest)
    fsync_tree(tmp)
    os.rename(tmp, final)
    fsync_path(final.parent)


def tombstone(final: Path, snapshot_id: str) -> Path:
    """The name a snapshot directory is renamed to before its space is freed."""
    return final.with_name(f"{DEL_PREFIX}{snapshot_id}")
