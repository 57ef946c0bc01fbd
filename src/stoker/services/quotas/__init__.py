"""Per-VM quotas and rate limits: CPU cap, memory, disk IOPS and bandwidth, network.

Every limit is made to bind and then read back: a CPU cap and a memory limit on the VMM's own
cgroup, disk rates and (where the VMM can) network rates by the VMM itself, tc on the TAP
otherwise. A limit that does not take effect is an error with the reason, never a silent
success. Quotas are applied at every start, restart and re-adoption and live when changed; a
monitor loop turns throttling, memory pressure and disks at their limit into
``quota.violation`` events and counters.

Modules: :mod:`.config` (the ``[quotas]`` section), :mod:`.placement` (VMM into its cgroup
at spawn), :mod:`.enforce` (limits bind and are read back), :mod:`.monitor` (violations),
:mod:`.service` (what the API and the lifecycle call).
"""

from stoker.services.quotas.config import QuotasConfig
from stoker.services.quotas.drives import drive_sizes
from stoker.services.quotas.enforce import Applied, Enforcer, to_io_limits
from stoker.services.quotas.errors import QuotaApplyError, QuotaInvalid, QuotaNotApplied
from stoker.services.quotas.monitor import QuotaMonitor
from stoker.services.quotas.placement import VMCgroups
from stoker.services.quotas.service import QuotaReport, QuotaService

__all__ = [
    "Applied",
    "Enforcer",
    "QuotaApplyError",
    "QuotaInvalid",
    "QuotaMonitor",
    "QuotaNotApplied",
    "QuotaReport",
    "QuotaService",
    "QuotasConfig",
    "VMCgroups",
    "drive_sizes",
    "to_io_limits",
]
