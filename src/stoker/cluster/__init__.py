"""Cluster mode: many stoker agents sharing one etcd (opt-in; single-host mode needs none of
this). ``etcd`` is the typed facade over the client library, ``lease`` keeps a node's lease
and reports when renewals fail, ``election`` picks the one active scheduler, ``keys`` is the
key layout. Placement itself is pure and lives in ``stoker.domain.placement``.
"""

from stoker.cluster.election import Election, Leader, NotLeader, leader, observe
from stoker.cluster.etcd import (
    Condition,
    Delete,
    Etcd,
    EtcdError,
    EtcdUnavailable,
    Get,
    KeyValue,
    Lease,
    LeaseNotFound,
    Page,
    Put,
    RevisionCompacted,
    TxnResult,
    WatchEvent,
    absent,
    parse_urls,
    same_incarnation,
    unchanged,
)
from stoker.cluster.lease import LeaseKeeper, LeaseState

__all__ = [
    "Condition",
    "Delete",
    "Election",
    "Etcd",
    "EtcdError",
    "EtcdUnavailable",
    "Get",
    "KeyValue",
    "Leader",
    "Lease",
    "LeaseKeeper",
    "LeaseNotFound",
    "LeaseState",
    "NotLeader",
    "Page",
    "Put",
    "RevisionCompacted",
    "TxnResult",
    "WatchEvent",
    "absent",
    "leader",
    "observe",
    "parse_urls",
    "same_incarnation",
    "unchanged",
]
