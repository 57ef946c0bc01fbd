"""How cluster failures reach an API caller: problem+json with what to do about them."""

from __future__ import annotations

from stoker.cluster.etcd import EtcdError, EtcdUnavailable
from stoker.services.errors import ServiceError


class ClusterUnavailable(ServiceError):
    """etcd cannot be reached (or refused): cluster writes cannot happen now."""

    status = 503
    title = "Cluster unavailable"


def unavailable(exc: EtcdError, writing: bool = True) -> ClusterUnavailable:
    what = "cluster writes are unavailable" if writing else "the cluster state cannot be read"
    if isinstance(exc, EtcdUnavailable):
        detail = (
            f"{what}: {exc}. VMs keep running and are supervised on their nodes; retry once "
            "etcd answers again"
        )
    else:
        detail = f"{what}: {exc}"
    return ClusterUnavailable(detail)
