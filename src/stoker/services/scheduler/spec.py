"""What an operator may ask for: the schedule body, the PATCH body and per-action options.

These checks need no state; the ones that need the VM list (does the target exist, does the
action take one) are in ``service.Scheduler``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from stoker.domain import cron
from stoker.domain.report import PERIODS
from stoker.domain.spec import CONTROL_RE, LABEL_KEY_RE, NAME_PATTERN
from stoker.services.errors import InvalidSpec
from stoker.services.scheduler.config import ZoneName

ScheduleAction = Literal["start", "stop", "restart", "snapshot", "report"]

#: the options each action understands
ACTION_OPTIONS: dict[str, set[str]] = {
    "start": set(),
    "stop": {"graceful", "timeout_s"},
    "restart": {"graceful"},
    "snapshot": set(),
    "report": {"period"},
}
#: a selector names labels, and a VM has at most 64 of them
MAX_SELECTOR_KEYS = 16
MAX_LABEL_VALUE = 256


def _check_selector(v: dict[str, str] | None) -> dict[str, str] | None:
    if v is not None and not v:
        raise ValueError("give at least one label, or target a VM instead")
    for key, value in (v or {}).items():
        if not LABEL_KEY_RE.fullmatch(key):
            raise ValueError(f"label key {key!r} must match {LABEL_KEY_RE.pattern}")
        if len(value) > MAX_LABEL_VALUE or CONTROL_RE.search(value):
            raise ValueError(
                f"label {key!r} value must be one line of at most {MAX_LABEL_VALUE} characters"
            )
    return v


class ScheduleSpec(BaseModel):
    """What an operator asks for; checks needing the VM list are in ``Scheduler``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str | None = Field(default=None, pattern=NAME_PATTERN)
    action: ScheduleAction
    vm: str | None = Field(default=None, max_length=64, description="a VM name or id")
    selector: dict[str, str] | None = Field(
        default=None,
        max_length=MAX_SELECTOR_KEYS,
        description="label selector: every VM with all these labels",
    )
    cron: str = Field(max_length=256, description="5-field cron expression or @hourly/@daily/...")
    tz: ZoneName | None = Field(
        default=None, max_length=64, description="IANA zone; default: the agent's"
    )
    spread_s: float = Field(default=0.0, ge=0, le=86400, description="stagger window")
    grace_s: float | None = Field(default=None, ge=0, le=7 * 86400)
    enabled: StrictBool = True
    options: dict[str, Any] = Field(
        default_factory=dict,
        max_length=len(set().union(*ACTION_OPTIONS.values())),
        description="report: {'period': daily|weekly|monthly}; stop/restart: "
        "{'graceful': bool, 'timeout_s': seconds}",
    )

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        cron.validate_cron(v)
        return " ".join(v.split())

    @field_validator("selector")
    @classmethod
    def _selector(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return _check_selector(v)


# a PATCH: only the fields given change; the result is checked as a whole ScheduleSpec
class ScheduleUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str | None = Field(default=None, pattern=NAME_PATTERN)
    action: ScheduleAction | None = None
    vm: str | None = Field(default=None, max_length=64)
    selector: dict[str, str] | None = Field(default=None, max_length=MAX_SELECTOR_KEYS)
    cron: str | None = Field(default=None, max_length=256)
    tz: str | None = Field(default=None, max_length=64)
    spread_s: float | None = Field(default=None, ge=0, le=86400)
    grace_s: float | None = Field(default=None, ge=0, le=7 * 86400)
    enabled: StrictBool | None = None
    options: dict[str, Any] | None = Field(
        default=None, max_length=len(set().union(*ACTION_OPTIONS.values()))
    )

    @field_validator("selector")
    @classmethod
    def _selector(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return _check_selector(v)


def check_options(action: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options with defaults filled in; InvalidSpec naming the option that is wrong."""
    allowed = ACTION_OPTIONS[action]
    unknown = set(options) - allowed
    if unknown:
        known = ", ".join(sorted(allowed)) or "none"
        raise InvalidSpec(
            "options", f"{', '.join(sorted(unknown))} not understood by {action} (known: {known})"
        )
    out = dict(options)
    if action == "report":
        period = out.setdefault("period", "daily")
        if period not in PERIODS:
            raise InvalidSpec("options.period", f"{period!r} is not one of {', '.join(PERIODS)}")
    if "graceful" in out and not isinstance(out["graceful"], bool):
        raise InvalidSpec("options.graceful", "must be true or false")
    if "timeout_s" in out:
        t = out["timeout_s"]
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t <= 86400:
            raise InvalidSpec("options.timeout_s", "must be a number of seconds in (0, 86400]")
    return out
