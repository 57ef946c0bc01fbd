"""What a manifest holds, validated by the models the API uses.

A ``[[vm]]`` table is a :class:`~stoker.domain.spec.VMSpec` (the API's own model, so the same
rules and messages) plus what only a manifest says about a VM: its quota, snapshot policy,
schedules, warm start, network and whether it should run. ``[defaults]`` give the same
things for every VM; how they merge is in :mod:`stoker.manifest.merge`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from stoker.domain import retention
from stoker.domain.quota import Quota
from stoker.domain.spec import Name, Probe, RestartPolicy, VMSpec
from stoker.services.scheduler.spec import ScheduleSpec

#: top-level tables and arrays a manifest may have
SECTIONS = ("defaults", "vm", "schedule", "network")
#: a network a VM may join without a ``[[network]]`` entry: the agent makes it on first use
BUILTIN_NETWORKS = frozenset({"default"})


class SnapshotPolicySpec(BaseModel):
    """Retention rules and automatic interval, canonicalised by the same domain functions the
    snapshot service uses, so equal policies compare equal in a plan. An empty string means
    "none" (and overrides a default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    retention: str | None = Field(
        default=None, max_length=512, description="e.g. 'daily:7,weekly:4'"
    )
    interval: str | None = Field(default=None, max_length=64, description="e.g. '1d', '6h'")

    @field_validator("retention")
    @classmethod
    def _retention(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        return str(retention.parse_policy(v))

    @field_validator("interval")
    @classmethod
    def _interval(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        step = retention.parse_duration(v)
        if step < timedelta(minutes=1):
            raise ValueError("must be at least 1m")
        return retention.format_duration(step)

    def is_empty(self) -> bool:
        return self.retention is None and self.interval is None


class NetworkSpec(BaseModel):
    """A ``[[network]]``: a managed network's name, subnet and isolation (its other options,
    such as IPv6 or an uplink, keep their defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    subnet: str = Field(description="a private IPv4 or IPv6 subnet, e.g. 10.20.0.0/24")
    isolation: Literal["isolated", "open"] = "isolated"

    @field_validator("subnet")
    @classmethod
    def _subnet(cls, v: str) -> str:
        try:
            net = ipaddress.ip_network(v, strict=True)
        except ValueError as exc:
            raise ValueError(f"{v!r} is not a subnet like 10.20.0.0/24 ({exc})") from None
        if not net.is_private:
            raise ValueError(f"{v} is not a private range (use 10/8, 172.16/12 or 192.168/16)")
        return str(net)


class DefaultsEntry(BaseModel):
    """``[defaults]``: applied to every VM that does not say otherwise."""

    model_config = ConfigDict(extra="forbid")

    quota: Quota | None = None
    snapshot_policy: SnapshotPolicySpec | None = None
    restart: RestartPolicy | None = None
    probes: list[Probe] | None = Field(default=None, max_length=16)
    labels: dict[str, str] | None = None
    warm_start: bool | None = None


class VMEntry(VMSpec):
    """A ``[[vm]]`` table after defaults were merged into it."""

    quota: Quota | None = None
    snapshot_policy: SnapshotPolicySpec | None = None
    schedules: list[dict[str, Any]] = Field(
        default_factory=list, description="inline schedules of this VM; validated one by one"
    )
    warm_start: bool | None = None
    network_name: Name | None = Field(
        default=None,
        description="the [[network]] this VM joins (or 'default'): short for network = "
        "{ mode = 'managed', name = ... }",
    )
    running: bool | None = Field(
        default=None,
        description="true: apply starts it; false: apply stops it; unset: apply leaves the "
        "run state alone (what a VM that schedules start and stop needs)",
    )

    def vm_spec(self) -> VMSpec:
        """The VMSpec part as the API would receive it: only the keys the manifest gave, so
        that the agent fills in the rest as it does for a request (the network above all)."""
        data = self.model_dump(include=set(VMSpec.model_fields), exclude_unset=True)
        return VMSpec.model_validate(data)


#: keys of a [[vm]] table that are not VMSpec fields
VM_MANIFEST_KEYS = tuple(k for k in VMEntry.model_fields if k not in VMSpec.model_fields)


@dataclass(frozen=True)
class Origin:
    """Where an object was declared, for messages from plan and apply."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file


@dataclass(frozen=True)
class DesiredVM:
    spec: VMSpec
    quota: Quota | None
    snapshot_policy: SnapshotPolicySpec | None
    warm_start: bool
    network_name: str | None
    running: bool | None
    origin: Origin = field(default=Origin("", 0), compare=False)

    @property
    def name(self) -> str:
        return self.spec.name

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.model_dump(mode="json"),
            "quota": self.quota.set_fields() if self.quota else None,
            "snapshot_policy": (
                self.snapshot_policy.model_dump() if self.snapshot_policy else None
            ),
            "warm_start": self.warm_start,
            "network_name": self.network_name,
            "running": self.running,
        }


@dataclass(frozen=True)
class DesiredSchedule:
    """A schedule with its name settled (derived for unnamed inline ones) and its options
    checked and filled in by the scheduler's own ``check_options``."""

    name: str
    spec: ScheduleSpec
    origin: Origin = field(default=Origin("", 0), compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {**self.spec.model_dump(mode="json"), "name": self.name}


@dataclass(frozen=True)
class Manifest:
    """A whole validated manifest, every collection sorted by name."""

    vms: tuple[DesiredVM, ...] = ()
    schedules: tuple[DesiredSchedule, ...] = ()
    networks: tuple[NetworkSpec, ...] = ()
    files: tuple[str, ...] = ()
    network_origins: dict[str, Origin] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "networks": [n.model_dump(mode="json") for n in self.networks],
            "vms": [vm.to_dict() for vm in self.vms],
            "schedules": [s.to_dict() for s in self.schedules],
        }

    @cached_property
    def hash(self) -> str:
        """sha256 of the content (not of the files: the same manifest split differently
        across files has the same hash)."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def vm(self, name: str) -> DesiredVM | None:
        return next((vm for vm in self.vms if vm.name == name), None)
