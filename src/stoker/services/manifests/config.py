"""The ``[manifest]`` section: a manifest file the agent itself keeps applied."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class ManifestConfig(BaseModel):
    """``stoker agent --manifest PATH`` sets ``path``; the rest only here or as
    ``STOKER_MANIFEST__PRUNE=true`` and so on."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    path: Path | None = Field(
        default=None,
        description="a manifest file or directory the agent applies at start and whenever "
        "it changes; while set, apply requests through the API are refused",
    )
    prune: bool = Field(default=False, description="apply with --prune")
    restart: bool = Field(default=False, description="apply with --restart")
    settle_s: float = Field(
        default=0.2,
        ge=0,
        le=60,
        description="wait this long after a change before reading: editors and config tools "
        "write a file in several steps",
    )
    poll_s: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="re-read the files this often as well, in case a change was not "
        "notified (inotify misses a directory replaced by a symlink swap)",
    )
