"""Per-VM quotas and rate limits: CPU cap, memory, disk IOPS and bandwidth, network.

Every limit is made to bind and then read back: a CPU cap and a memory limit on the VMM's own
cgroup, a QEMU throttle group (or Firecracker drive limiter) for disk, tc on the TAP (or
Firecracker's interface limiter) for network. A limit that does not take effect is an error
with the reason, never a silent success. Quotas are applied at every start, restart and
re-adoption (``lifecycle.on_vmm_up``) and live when changed; a monitor loop turns throttling,
memory pressure and disks at their limit into ``quota.violation`` events and counters.

Modules: :mod:`.settings` (the ``[quotas]`` section), :mod:`.placement` (VMM into its cgroup
at spawn), :mod:`.enforce` (limits bind and are read back), :mod:`.monitor` (violations),
:mod:`.view` (the answer shown), :mod:`.service` (the API the routes and hooks call),
:mod:`.wiring` (``install``).
"""

from stoker.services.quotas.drives import drive_sizes
from stoker.services.quotas.enforce import Applied, Enforcer, to_io_limits
from stoker.services.quotas.errors import QuotaApplyError, QuotaInvalid, QuotaNotApplied
from stoker.services.quotas.monitor import QuotaMonitor
from stoker.services.quotas.placement import CgroupPlacingDriver, VMCgroups
from stoker.services.quotas.service import QuotaService
from stoker.services.quotas.settings import QuotasConfig
from stoker.services.quotas.wiring import install

__all__ = [
    "Applied",
    "CgroupPlacingDriver",
    "Enforcer",
    "QuotaApplyError",
    "QuotaInvalid",
    "QuotaMonitor",
    "QuotaNotApplied",
    "QuotaService",
    "QuotasConfig",
    "VMCgroups",
    "drive_sizes",
    "install",
    "to_io_limits",
]
