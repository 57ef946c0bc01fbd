"""The ``[cluster]`` section: where etcd is, who this node is, and how fast it fences.

Absent (no ``[cluster]`` table, no ``--cluster``): single-host mode, none of the cluster code
runs and no etcd is needed. Every number is bounded and finite; the fence window derived from
them is checked here, so a node can never be configured to fence after its lease may expire.
"""

from __future__ import annotations

import re
import socket
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from stoker.cluster.etcd import parse_urls
from stoker.cluster.keys import node_name as checked_node_name
from stoker.config import AgentConfig, section
from stoker.domain.spec import CONTROL_RE, LABEL_KEY_RE

#: the shortest fence window (seconds between the last renewal and the start of the kill)
#: that leaves room for a few renewal attempts
MIN_FENCE_WINDOW_S = 0.5
MAX_LABELS = 32


def _default_node_name() -> str:
    name = socket.gethostname().split(".", 1)[0] or "node"
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)[:63]


class ClusterConfig(BaseModel):
    """``[cluster]`` (env: ``STOKER_CLUSTER__<KEY>``; ``stoker agent --cluster URL,...``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    endpoints: list[str] = Field(
        min_length=1,
        max_length=16,
        description="client URLs of every etcd member, http://HOST:PORT",
    )
    node_name: str = Field(default_factory=_default_node_name, max_length=63)
    labels: dict[str, str] = Field(default_factory=dict, max_length=MAX_LABELS)
    advertise_url: str | None = Field(
        default=None,
        max_length=255,
        description="how other nodes and the CLI reach this node's API over TCP",
    )
    lease_ttl_s: int = Field(default=5, ge=2, le=60, description="node lease TTL (seconds)")
    policy: Literal["binpack", "spread"] = "binpack"
    fence_fraction: float = Field(
        default=0.6,
        ge=0.3,
        le=0.8,
        description="fence once this fraction of the TTL passed since the last renewal",
    )
    kill_budget_s: float = Field(
        default=0.5, ge=0.05, le=10, description="time allowed to kill and reap the VMMs"
    )
    hold_when_etcd_down: bool = Field(
        default=True,
        description="keep VMs running while every etcd member is down or leaderless (no "
        "lease can expire then); false: fence on any renewal failure",
    )
    etcd_timeout_s: float = Field(default=2.0, gt=0, le=30, description="per etcd call")
    reconcile_interval_s: float = Field(default=1.0, ge=0.1, le=60)
    restart_backoff_max_s: float = Field(default=60.0, ge=1, le=3600)

    @field_validator("endpoints", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return value.split(",") if isinstance(value, str) else value

    @field_validator("endpoints")
    @classmethod
    def _urls(cls, value: list[str]) -> list[str]:
        return parse_urls(value)

    @field_validator("node_name")
    @classmethod
    def _node(cls, value: str) -> str:
        return checked_node_name(value)

    @field_validator("labels", mode="before")
    @classmethod
    def _label_string(cls, value: Any) -> Any:
        """``zone=a,disk=ssd`` from the environment or the command line."""
        if not isinstance(value, str):
            return value
        labels: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in value.split(","))):
            key, sep, val = item.partition("=")
            if not sep:
                raise ValueError(f"label {item!r} is not key=value")
            labels[key.strip()] = val.strip()
        return labels

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        for key, val in value.items():
            if not LABEL_KEY_RE.fullmatch(key):
                raise ValueError(f"label key {key!r} must match {LABEL_KEY_RE.pattern}")
            if len(val) > 256 or CONTROL_RE.search(val):
                raise ValueError(f"label {key!r}: at most 256 characters, no control characters")
        return value

    @field_validator("advertise_url")
    @classmethod
    def _advertise(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
            raise ValueError(f"{value!r} is not of the form http(s)://HOST:PORT")
        return value

    @model_validator(mode="after")
    def _window(self) -> ClusterConfig:
        if self.fence_window_s < MIN_FENCE_WINDOW_S:
            raise ValueError(
                f"fence window {self.fence_window_s:.2f} s (lease_ttl_s x fence_fraction - "
                f"kill_budget_s) is shorter than {MIN_FENCE_WINDOW_S} s: raise lease_ttl_s "
                "or lower kill_budget_s"
            )
        return self

    @property
    def fence_window_s(self) -> float:
        """Seconds from the last acknowledged renewal to the moment the node starts killing."""
        return self.lease_ttl_s * self.fence_fraction - self.kill_budget_s


def cluster_config(config: AgentConfig) -> ClusterConfig | None:
    """The validated ``[cluster]`` section, or None in single-host mode (no such table)."""
    if "cluster" not in config.sections:
        return None
    return section(config, "cluster", ClusterConfig)
