"""Snapshots: create, restore, verify, retention and pruning, automatic snapshots.

One module per job: ``config``, ``layout`` (on-disk format and manifest),
``files`` (durable file work), ``checksums``, ``space`` (free-space checks), ``context``
(what the operations share), ``create``, ``restore``, ``verify`` and ``deep_verify``,
``delete``, ``protection``, ``policy``, ``prune``, ``automation`` (auto snapshots and the
timer's tick), ``cleanup`` (start-up reconciliation) and ``service`` (the facade callers
use). The names other modules import are re-exported here.
"""

from stoker.services.snapshots.automation import AutoResult
from stoker.services.snapshots.checksums import GrowingFileHasher, hash_tree
from stoker.services.snapshots.cleanup import SnapshotHousekeeping
from stoker.services.snapshots.config import SnapshotsConfig
from stoker.services.snapshots.errors import InsufficientSpace, RestoreFailed, SnapshotFailed
from stoker.services.snapshots.layout import MANIFEST, MEMORY
from stoker.services.snapshots.policy import Policy
from stoker.services.snapshots.prune import PruneItem, PruneResult
from stoker.services.snapshots.service import SnapshotService

__all__ = [
    "MANIFEST",
    "MEMORY",
    "AutoResult",
    "GrowingFileHasher",
    "InsufficientSpace",
    "Policy",
    "PruneItem",
    "PruneResult",
    "RestoreFailed",
    "SnapshotFailed",
    "SnapshotHousekeeping",
    "SnapshotService",
    "SnapshotsConfig",
    "hash_tree",
]
