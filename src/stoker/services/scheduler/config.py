"""The ``[scheduler]`` config section and the time zone names it and schedules use.

Zones are kept as IANA names, never as fixed offsets, so an 08:00 schedule stays at 08:00
local time across DST changes.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from stoker.domain import cron


def zone(name: str) -> ZoneInfo:
    """The zone for an IANA name; ValueError (with a hint) for anything else."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {name!r}; use an IANA name like Europe/Berlin"
        ) from None


def _known_zone(name: str) -> str:
    zone(name)
    return name


#: a ``str`` field that must name a known IANA zone
ZoneName = Annotated[str, AfterValidator(_known_zone)]


def host_tz_name(environ: dict[str, str] | None = None, etc: Path = Path("/etc")) -> str:
    """The host's IANA zone: $TZ, the /etc/localtime link, /etc/timezone, else UTC.

    A name, not ``datetime.now().astimezone().tzinfo``: that is a fixed offset, which would
    move every 08:00 schedule by an hour at the next DST change.
    """
    env = os.environ if environ is None else environ
    candidates = [env.get("TZ", "").lstrip(":")]
    with contextlib.suppress(OSError):
        target = os.readlink(etc / "localtime")
        if "zoneinfo/" in target:
            candidates.append(target.split("zoneinfo/", 1)[1])
    with contextlib.suppress(OSError):
        candidates.append((etc / "timezone").read_text().strip())
    for name in candidates:
        if name:
            with contextlib.suppress(ValueError):
                zone(name)
                return name
    return "UTC"


class SchedulerConfig(BaseModel):
    """The ``[scheduler]`` section of the agent config."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    enabled: bool = True
    tz: ZoneName | None = Field(default=None, description="default zone; default: the host's")
    grace_s: float = Field(default=600.0, ge=0, le=7 * 86400)
    tick_s: float = Field(default=30.0, gt=0, le=3600, description="longest sleep between checks")
    default_report: bool = Field(default=True, description="install the daily report schedule")
    report_cron: str = Field(default="5 0 * * *", max_length=256)
    stop_grace_s: float = Field(
        default=10.0, ge=0, le=600, description="how long running actions may finish at stop"
    )

    @field_validator("report_cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        cron.validate_cron(v)
        return v
