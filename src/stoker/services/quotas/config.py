"""The ``[quotas]`` config section: default limits plus how they are enforced.

Validated at install so that a typo stops the agent with the key to fix, instead of an agent
that runs without the limits the operator meant to set.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ConfigDict, Field

from stoker.domain.quota import FIELDS, Quota
from stoker.domain.units import DEFAULT_QEMU_OVERHEAD_BYTES, MiB
from stoker.host.cgroups import DEFAULT_ROOT


class QuotasConfig(Quota):
    """Default limits (the :class:`Quota` fields) and the knobs of enforcement and monitoring."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    cgroup_root: Path = DEFAULT_ROOT
    cgroup_parent: str = Field(
        default="stoker", max_length=255, description="parent of the per-VM cgroups"
    )
    memory_overhead_mib: int = Field(
        default=DEFAULT_QEMU_OVERHEAD_BYTES // MiB,
        ge=16,
        le=1024 * 1024,
        description="VMM memory above guest RAM allowed by the cgroup limit",
    )
    monitor_interval_s: float = Field(default=10.0, gt=0, le=3600)
    disk_at_limit_ratio: float = Field(default=0.9, gt=0, le=1)

    @property
    def overhead_bytes(self) -> int:
        return self.memory_overhead_mib * MiB

    def defaults(self) -> Quota:
        return Quota(**{name: getattr(self, name) for name in FIELDS})
