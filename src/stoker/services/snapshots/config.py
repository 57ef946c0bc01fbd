"""The ``[snapshots]`` section of the agent config, and the time zone retention uses.

Validated once at install so a typo in the config stops the agent with a message naming the
key, instead of surfacing later as a failed snapshot.
"""

from __future__ import annotations

import contextlib
import os
from datetime import UTC, tzinfo
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field


class SnapshotsConfig(BaseModel):
    """The ``[snapshots]`` section of the agent config."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    margin_mib: int = Field(
        default=256,
        ge=0,
        le=2**40,
        description="free space to leave beyond a snapshot's expected size",
    )
    timezone: str | None = Field(
        default=None, max_length=64, description="zone for retention periods (default: the host's)"
    )
    tick_s: float = Field(
        default=30.0, gt=0, le=3600, description="how often automatic policies are due"
    )
    restore_timeout_s: float = Field(default=120.0, gt=0, le=86_400)
    deep_verify_settle_s: float = Field(
        default=1.0, ge=0, le=3600, description="how long a deep-verified VM must keep running"
    )
    deep_verify_timeout_s: float = Field(default=120.0, gt=0, le=86_400)

    def zone(self) -> tzinfo:
        """The zone retention periods ("daily", "weekly") are counted in."""
        return ZoneInfo(self.timezone) if self.timezone else host_timezone()


def host_timezone() -> tzinfo:
    """The host's zone as a real IANA zone (so DST is known), falling back to UTC."""
    candidates = [os.environ.get("TZ", "").lstrip(":")]
    with contextlib.suppress(OSError):
        candidates.append(Path("/etc/timezone").read_text().strip())
    with contextlib.suppress(OSError):
        target = os.readlink("/etc/localtime")
        if "zoneinfo/" in target:
            candidates.append(target.split("zoneinfo/", 1)[1])
    for name in candidates:
        if name:
            with contextlib.suppress(ZoneInfoNotFoundError, ValueError):
                return ZoneInfo(name)
    return UTC


def zone_name(tz: tzinfo) -> str:
    """The IANA name users wrote (``Europe/Berlin``), not Python's repr of the zone."""
    return getattr(tz, "key", None) or str(tz)
