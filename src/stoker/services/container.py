"""The services one agent runs, as the composition root built them; the API reaches them
through this.

Every field is typed and always present: a capability is part of the agent or it is not
written here, so no caller ever asks "is it installed?".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from stoker.services.directory import VMDirectory
from stoker.services.events import EventBus
from stoker.services.health import HealthService
from stoker.services.hooks import HookService
from stoker.services.lifecycle import Lifecycle
from stoker.services.manifests import ManifestService
from stoker.services.metrics import Metrics
from stoker.services.networks import NetworkService
from stoker.services.quotas import QuotaService
from stoker.services.recovery import Recovery
from stoker.services.reports import ReportGenerator
from stoker.services.resources import ResourceService
from stoker.services.scheduler import Scheduler
from stoker.services.snapshots import SnapshotHousekeeping, SnapshotService
from stoker.services.warmstart import WarmStarts

if TYPE_CHECKING:  # imported only in cluster mode (it brings gRPC): docs/cluster.md
    from stoker.cluster.service import ClusterNode


class Background(Protocol):
    """A loop the agent runs beside the API (health checks, sampling, schedules...)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass(frozen=True)
class Services:
    directory: VMDirectory
    events: EventBus
    lifecycle: Lifecycle
    resources: ResourceService
    metrics: Metrics
    health: HealthService
    recovery: Recovery
    hooks: HookService
    networks: NetworkService
    quotas: QuotaService
    snapshots: SnapshotService
    snapshot_housekeeping: SnapshotHousekeeping
    scheduler: Scheduler
    reports: ReportGenerator
    manifests: ManifestService
    warm: WarmStarts
    #: started in this order after VMs are re-adopted, stopped in reverse before the agent
    #: lets go of them
    background: tuple[Background, ...]
    #: cluster mode (``[cluster]`` / ``--cluster``); None on a single host
    cluster: ClusterNode | None = None
