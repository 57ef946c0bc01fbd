"""The identity of a VMM process, as persisted to find it again after an agent restart.

A pid alone is not an identity (pids are reused); the pid together with the process's start
time (field 22 of /proc/<pid>/stat) is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ProcessRecord:
    """What must be persisted, before anything can fail, to find a VMM again later."""

    pid: int
    start_time: int  # clock ticks since boot, field 22 of /proc/<pid>/stat
    control_socket: str
    accel: str = ""
    argv: tuple[str, ...] = ()
    #: driver-specific facts (a jail root, a metrics path, ...), JSON-safe
    facts: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProcessRecord:
        return cls(
            pid=int(data["pid"]),
            start_time=int(data["start_time"]),
            control_socket=str(data["control_socket"]),
            accel=str(data.get("accel", "")),
            argv=tuple(str(a) for a in data.get("argv", ())),
            # rows written before the field was renamed call it "extra"
            facts=dict(data.get("facts", data.get("extra", {}))),
        )
