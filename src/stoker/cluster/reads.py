"""What every cluster API operation does around the node's view of etcd: refuse to answer
from a view that was never filled, wait until the view shows its own writes, and create a
named object exactly once.

One place, so that VMs, networks and schedules answer a race, an outage and a stale view
the same way (409 naming the winner, 503 saying VMs keep running, the write visible in the
answer).
"""

from __future__ import annotations

import asyncio

from stoker.cluster.errors import unavailable
from stoker.cluster.etcd import Etcd, EtcdError
from stoker.cluster.records import CreatedRecord, load
from stoker.cluster.view import ClusterView
from stoker.services.errors import Conflict

#: how long a write's answer waits for the node's view to show it
READ_YOUR_WRITES_S = 2.0


def require_synced(view: ClusterView, last_error: str | None = None) -> None:
    """503 while this node has never read the cluster (nothing to answer from yet)."""
    if not view.synced.is_set():
        raise unavailable(
            EtcdError(
                "this node has not read the cluster state yet "
                f"({last_error or 'connecting to etcd'})"
            ),
            writing=False,
        )


async def seen(view: ClusterView, revision: int) -> None:
    """Wait until the view has caught up with ``revision`` (or a short timeout)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READ_YOUR_WRITES_S
    version = view.version
    while view.revision < revision and loop.time() < deadline:
        version = await view.wait_changed(version, deadline - loop.time())


async def create_once(
    etcd: Etcd, view: ClusterView, key: str, record: CreatedRecord, what: str
) -> None:
    """Create ``key`` if absent: of concurrent creates of one name, on any nodes, exactly one
    succeeds; the others get 409 naming who created it (``what``: "a cluster VM named 'x'").
    Returns once the node's view shows the new object."""
    try:
        result = await etcd.create(key, record.dump())
    except EtcdError as exc:
        raise unavailable(exc) from None
    if not result.succeeded:
        existing = result.got.get(key)
        winner = load(type(record), existing.value, key) if existing else None
        who = f" (created by node {winner.created_by} at {winner.created_at})" if winner else ""
        raise Conflict(f"{what} already exists{who}")
    await seen(view, result.revision)
