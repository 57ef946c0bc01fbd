"""Manifests on the wire: the files a plan or an apply sends, the plan as the agent answers
it, and the applied manifest with the objects it manages."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool

__all__ = [
    "AppliedManifestOut",
    "ApplyOut",
    "ChangeOut",
    "DriftOut",
    "KeptOut",
    "ManagedObjectOut",
    "ManifestFile",
    "ManifestProblemOut",
    "ManifestRequest",
    "PlanOut",
    "StepOut",
]

#: the largest file a request may carry (the agent's body limit, 1 MiB by default, binds first)
MAX_FILE_CHARS = 4 * 1024 * 1024


class ManifestFile(BaseModel):
    """One file of a manifest: the agent never reads a path a request names, the client
    sends the content."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        min_length=1,
        max_length=1024,
        description="the file's name as the operator gave it; problems are reported with it",
        examples=["examples/host.toml"],
    )
    content: str = Field(max_length=MAX_FILE_CHARS, description="the TOML text")


class ManifestRequest(BaseModel):
    """The body of a plan or an apply."""

    model_config = ConfigDict(extra="forbid")

    files: list[ManifestFile] = Field(
        min_length=1, max_length=256, description="the manifest's files, validated together"
    )
    prune: StrictBool = Field(
        default=False,
        description="delete what an earlier apply created and the manifest no longer has",
    )
    restart: StrictBool = Field(
        default=False, description="restart running VMs whose change needs a restart"
    )
    width: int = Field(default=80, ge=40, le=400, description="columns of the plan's text")


class ChangeOut(BaseModel):
    field: str = Field(description="e.g. memory_mib, labels.tier, drives[0].path")
    restart: bool = Field(description="reaches a running VM only through a restart")
    old: Any = Field(default=None, description="absent or null: not set before")
    new: Any = Field(default=None, description="absent or null: not set after")


class StepOut(BaseModel):
    kind: str = Field(description="network, vm, quota, snapshot_policy or schedule")
    op: str = Field(
        description="create, update, update-restart, pending-restart, replace, delete, start, stop"
    )
    name: str
    note: str
    adopt: bool = Field(description="made by hand: the apply takes it over")
    changes: list[ChangeOut]


class DriftOut(BaseModel):
    """A managed object changed by hand since the last apply."""

    kind: str
    name: str
    field: str | None = None
    applied: Any = None
    now: Any = None
    deleted: bool = False


class KeptOut(BaseModel):
    kind: str
    name: str


class PlanOut(BaseModel):
    manifest_hash: str
    changed: bool
    exit_code: int = Field(description="0: nothing to do; 2: something to do")
    prune: bool
    restart: bool
    summary: dict[str, int] = Field(description="steps per op")
    steps: list[StepOut]
    drift: list[DriftOut]
    kept: list[KeptOut] = Field(description="managed, no longer declared, kept (no --prune)")
    text: str = Field(description="the plan as a person reads it")


class ApplyOut(BaseModel):
    plan: PlanOut
    done: int = Field(description="steps carried out")
    applied_at: datetime


class ManagedObjectOut(BaseModel):
    kind: str
    name: str
    object_id: str
    applied: dict[str, Any] | None = Field(description="the values the last apply set")
    pending: dict[str, Any] | None = Field(
        default=None,
        description="values an apply was setting when it stopped (the next plan resolves it)",
    )
    updated_at: datetime


class AppliedManifestOut(BaseModel):
    manifest_hash: str | None = Field(description="null: nothing applied yet")
    applied_at: datetime | None
    origin: str | None = Field(description="api, or file (stoker agent --manifest)")
    summary: dict[str, int]
    files: list[ManifestFile]
    objects: list[ManagedObjectOut]
    applying_hash: str | None = Field(
        description="an apply that started and did not finish (apply again to finish it)"
    )
    applying_since: datetime | None
    failure: str | None = Field(description="why that apply stopped, when a step failed")
    watching: str | None = Field(description="the file the agent keeps applied, if any")


class ManifestProblemOut(BaseModel):
    """One entry of an invalid manifest's problem+json ``errors``."""

    file: str
    line: int = Field(description="0: the file as a whole")
    field: str = Field(description="the key's full path, e.g. vm[web].quota.cpu_percent")
    message: str
