"""Cluster mode inside one agent, in two parts because the lifecycle sits between them:

- ``ClusterMembership`` (built before the lifecycle): the etcd connection, the view of the
  cluster, this node's session (lease, registration, fence) and the start guard the lifecycle
  is given;
- ``ClusterNode`` (built after it): the fencer, the reconciler, the scheduler and the
  operations the API calls; a ``Background`` of the agent.

Nothing here exists in single-host mode: the composition root builds these only when the
config has a ``[cluster]`` table.
"""

from __future__ import annotations

import logging
from pathlib import Path

from stoker import __version__
from stoker.cluster.config import ClusterConfig, cluster_config
from stoker.cluster.etcd import Etcd
from stoker.cluster.fencer import Fencer
from stoker.cluster.network_ops import ClusterNetworkOps
from stoker.cluster.network_sync import NetworkSync
from stoker.cluster.operations import ClusterOps
from stoker.cluster.ownership import Ownership
from stoker.cluster.reconciler import Reconciler
from stoker.cluster.records import CapacityRecord, NodeInfo, now_utc
from stoker.cluster.schedule_ops import ClusterScheduleOps
from stoker.cluster.schedule_runner import ScheduleRunner
from stoker.cluster.scheduler import ClusterScheduler
from stoker.cluster.session import GuardLink, NodeSession
from stoker.cluster.view import ClusterView
from stoker.config import AgentConfig, ConfigError
from stoker.domain.capacity import NodeCapacity
from stoker.domain.events import Event
from stoker.services.lifecycle import Lifecycle
from stoker.services.networks import NetworkService

log = logging.getLogger("stoker.cluster")


class ClusterMembership:
    def __init__(
        self, cfg: ClusterConfig, data_dir: Path, capacity: NodeCapacity, guard: bool = True
    ) -> None:
        self.cfg = cfg
        self.etcd = Etcd(cfg.endpoints, timeout=cfg.etcd_timeout_s)
        self.view = ClusterView(self.etcd)
        started = now_utc()

        def info() -> NodeInfo:
            return NodeInfo(
                name=cfg.node_name,
                capacity=CapacityRecord.of(capacity),
                labels=cfg.labels,
                address=cfg.advertise_url,
                version=__version__,
                started_at=started,
            )

        self.session = NodeSession(
            self.etcd, cfg, info, GuardLink(data_dir / "cluster", data_dir, spawn=guard)
        )
        #: the lifecycle's start guard for cluster VMs
        self.ownership = Ownership(self.session, self.view)

    @classmethod
    def from_config(cls, config: AgentConfig, capacity: NodeCapacity) -> ClusterMembership:
        """From the agent's ``[cluster]`` table (ConfigError naming the key when invalid)."""
        cfg = cluster_config(config)
        if cfg is None:
            raise ConfigError("cluster mode needs a [cluster] table with endpoints")
        return cls(cfg, config.data_dir, capacity)

    def node(self, lifecycle: Lifecycle, networks: NetworkService) -> ClusterNode:
        """The rest of cluster mode, once the lifecycle exists."""
        return ClusterNode(self, lifecycle, networks)


class ClusterNode:
    def __init__(
        self, membership: ClusterMembership, lifecycle: Lifecycle, networks: NetworkService
    ) -> None:
        self.membership = membership
        self.cfg = membership.cfg
        self.etcd = membership.etcd
        self.view = membership.view
        self.session = membership.session
        self.fencer = Fencer(self.session, lifecycle)
        self.reconciler = Reconciler(
            self.etcd, self.view, self.session, membership.ownership, lifecycle, self.fencer
        )
        self.scheduler = ClusterScheduler(self.etcd, self.view, self.session)
        self.ops = ClusterOps(self.etcd, self.view, self.session, self.scheduler)
        #: cluster networks: every node makes its local copies; the API on every node
        self.network_sync = NetworkSync(
            self.etcd, self.view, self.session, networks, lifecycle.directory, lifecycle.events
        )
        self.network_ops = ClusterNetworkOps(self.etcd, self.view, self.session)
        #: cluster schedules: run by whichever node's scheduler leads; the API on every node
        self.schedule_runner = ScheduleRunner(
            self.etcd, self.view, self.cfg.node_name, lifecycle.events, self.cfg.etcd_timeout_s
        )
        self.scheduler.leader_tasks.append(self.schedule_runner.tick)
        self.schedules = ClusterScheduleOps(self.etcd, self.view, self.cfg.node_name)

    def on_event(self, event: Event) -> None:
        self.reconciler.on_event(event)

    async def start(self) -> None:
        """The fence first (re-adopted cluster VMs are guarded from the start), then the
        lease, the view, the reconciler and the scheduler candidacy."""
        await self.session.start()
        self.fencer.refresh_guard()
        await self.fencer.start()
        await self.view.start()
        await self.network_sync.start()
        await self.reconciler.start()
        await self.scheduler.start()
        log.info(
            "cluster mode: node %s, etcd %s, lease TTL %d s, fence window %.2f s",
            self.cfg.node_name,
            ",".join(self.cfg.endpoints),
            self.cfg.lease_ttl_s,
            self.cfg.fence_window_s,
        )

    async def stop(self) -> None:
        """Let go without touching the VMs or the lease: a restarted agent resumes the lease,
        and the guard process fences the VMs if none does within the window."""
        await self.scheduler.stop()
        await self.reconciler.stop()
        await self.network_sync.stop()
        await self.fencer.stop()
        await self.view.stop()
        await self.session.stop()
        await self.etcd.close()
