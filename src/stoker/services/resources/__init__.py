"""Node capacity and reservations, usage sampling, history, prediction and alerts.

The gate reserves a VM's vCPUs and memory before its VMM is spawned, in one critical
section and one database transaction, and releases them once the VMM is gone; the rows
outlive the agent, so a re-adopted VM stays counted. A background loop samples each running
VM every ``interval_s``, stores node and VM samples (folded into coarser buckets as they age),
fits a trend over the prediction window and raises or clears threshold alerts as events.

One module per job: ``config`` (the ``[resources]`` section, node capacity), ``gate``
(reservations), ``service`` (sampling loop, history, views), ``prediction``, ``alerting``.
"""

from stoker.services.resources.alerting import AlertView, UsageAlerts
from stoker.services.resources.config import ResourcesConfig, node_capacity
from stoker.services.resources.gate import CapacityGate, request_of
from stoker.services.resources.service import (
    BUCKET_S,
    FREE_STATES,
    HOLDING_STATES,
    RAW_KEEP_S,
    ResourceService,
)

__all__ = [
    "BUCKET_S",
    "FREE_STATES",
    "HOLDING_STATES",
    "RAW_KEEP_S",
    "AlertView",
    "CapacityGate",
    "ResourceService",
    "ResourcesConfig",
    "UsageAlerts",
    "node_capacity",
    "request_of",
]
