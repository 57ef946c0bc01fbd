"""The snapshot-specific 409s, so the API's problem titles say which step failed."""

from __future__ import annotations

from stoker.services.errors import Conflict


class InsufficientSpace(Conflict):
    title = "Not enough disk space"


class SnapshotFailed(Conflict):
    title = "Snapshot failed"


class RestoreFailed(Conflict):
    title = "Restore failed"
