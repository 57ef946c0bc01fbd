"""Protecting a snapshot from pruning (and releasing it again).

The flag is written to the manifest first and the index second, because the manifest is
the truth the start-up cleanup rebuilds the index from.
"""

from __future__ import annotations

from pathlib import Path

from stoker.domain.events import EventType
from stoker.domain.snapshots import SnapshotRecord
from stoker.services.snapshots import layout
from stoker.services.snapshots.context import SnapshotContext


def set_protected(ctx: SnapshotContext, snapshot_id: str, protected: bool) -> SnapshotRecord:
    snap = ctx.get(snapshot_id)
    manifest = layout.read_manifest(snap)
    manifest["protected"] = protected
    layout.write_manifest(Path(snap.path), manifest)
    ctx.store.set_protected(snap.id, protected)
    word = "protected" if protected else "released"
    ctx.events.publish(
        EventType.SNAPSHOT_PROTECTED if protected else EventType.SNAPSHOT_UNPROTECTED,
        f"{snap.vm_name}: snapshot {snap.id} {word}",
        snap.vm_id,
        snapshot=snap.id,
    )
    return ctx.get(snap.id)
