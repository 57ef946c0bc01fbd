"""The ``[resources]`` section, and the node capacity they describe."""

from __future__ import annotations

from typing import Any

import psutil
from pydantic import BaseModel, ConfigDict, Field, field_validator

from stoker.domain import alerts
from stoker.domain.capacity import NodeCapacity
from stoker.domain.units import MiB, parse_duration


class ResourcesConfig(BaseModel):
    """The ``[resources]`` section (env: ``STOKER_RESOURCES__<KEY>``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_vms: int = Field(default=50, ge=0, le=100_000)
    cpu_overcommit: float = Field(default=2.0, gt=0, le=100)
    memory_headroom: float = Field(default=0.20, ge=0, lt=1)
    host_cpus: int | None = Field(
        default=None, ge=1, le=65_536, description="override the host's count"
    )
    host_memory_mib: int | None = Field(
        default=None, ge=1, le=1024**3, description="override host memory"
    )
    interval_s: float = Field(default=60.0, ge=1, le=3600)
    history_s: float = Field(default=86_400.0, ge=60, le=90 * 86_400)
    prediction_window_s: float = Field(default=3600.0, ge=10, le=90 * 86_400)
    cpu_alert: float = Field(default=0.80, gt=0, le=10, description="fraction of capacity")
    memory_alert: float = Field(default=0.90, gt=0, le=10, description="fraction of capacity")
    alert_hysteresis: float = Field(default=alerts.DEFAULT_HYSTERESIS, ge=0, le=1)

    @field_validator("interval_s", "history_s", "prediction_window_s", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value) if isinstance(value, str) else value


def node_capacity(cfg: ResourcesConfig) -> tuple[NodeCapacity, dict[str, str]]:
    """Capacity from the host, with the config's overrides; also says where each came from."""
    cpus = cfg.host_cpus or psutil.cpu_count(logical=True) or 1
    memory = cfg.host_memory_mib * MiB if cfg.host_memory_mib else psutil.virtual_memory().total
    source = {
        "cpus": "config" if cfg.host_cpus else "host",
        "memory": "config" if cfg.host_memory_mib else "host",
    }
    cap = NodeCapacity(
        physical_cpus=cpus,
        memory_bytes=memory,
        max_vms=cfg.max_vms,
        cpu_overcommit=cfg.cpu_overcommit,
        memory_headroom=cfg.memory_headroom,
    )
    return cap, source
