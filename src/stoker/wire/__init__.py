"""The wire models: what the API answers and what the Python client returns.

One vocabulary on both sides of the HTTP connection (``api.get_vm("web").state`` in the
client is the ``state`` the API wrote). These modules may import ``stoker.domain`` and
nothing else of stoker.
"""

from stoker.wire.events import (
    EventOut,
)
from stoker.wire.quotas import (
    DriveThrottleOut,
    LimitOut,
    ObservedOut,
    QuotaOut,
    ViolationOut,
)
from stoker.wire.resources import (
    AlertOut,
    AllocationOut,
    CapacityOut,
    ConfidenceOut,
    NodePointOut,
    NodeUsageOut,
    PredictionOut,
    ResourcesOut,
    UsageOut,
    VMAllocationOut,
    VMMetricsList,
    VMMetricsOut,
    VMPointOut,
)
from stoker.wire.schedules import (
    ReportOut,
    ReportSummary,
    RunOut,
    ScheduleOut,
)
from stoker.wire.snapshots import (
    AutoSnapshotOut,
    CreateSnapshot,
    FileOut,
    PolicyIn,
    PolicyOut,
    PruneItemOut,
    PruneOut,
    RestoreOut,
    SnapshotOut,
    VerificationOut,
)
from stoker.wire.vms import (
    ConsoleOut,
    HealthOut,
    ProbeResultOut,
    ProbeStatusOut,
    ProcessOut,
    RestartInfo,
    RestartRequest,
    StopRequest,
    TransitionOut,
    VersionOut,
    VMMLivenessOut,
    VMOut,
)

__all__ = [
    "AlertOut",
    "AllocationOut",
    "AutoSnapshotOut",
    "CapacityOut",
    "ConfidenceOut",
    "ConsoleOut",
    "CreateSnapshot",
    "DriveThrottleOut",
    "EventOut",
    "FileOut",
    "HealthOut",
    "LimitOut",
    "NodePointOut",
    "NodeUsageOut",
    "ObservedOut",
    "PolicyIn",
    "PolicyOut",
    "PredictionOut",
    "ProbeResultOut",
    "ProbeStatusOut",
    "ProcessOut",
    "PruneItemOut",
    "PruneOut",
    "QuotaOut",
    "ReportOut",
    "ReportSummary",
    "ResourcesOut",
    "RestartInfo",
    "RestartRequest",
    "RestoreOut",
    "RunOut",
    "ScheduleOut",
    "SnapshotOut",
    "StopRequest",
    "TransitionOut",
    "UsageOut",
    "VMAllocationOut",
    "VMMLivenessOut",
    "VMMetricsList",
    "VMMetricsOut",
    "VMOut",
    "VMPointOut",
    "VerificationOut",
    "VersionOut",
    "ViolationOut",
]
