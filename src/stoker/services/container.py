"""The set of services one agent runs; the API reaches them through this."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from stoker.services.events import EventBus
from stoker.services.lifecycle import Lifecycle


class Background(Protocol):
    """A loop the agent runs beside the API (health checks, sampling, schedules...)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass
class Services:
    lifecycle: Lifecycle
    events: EventBus
    #: later capabilities register here by name (health, resources, quotas, snapshots, ...)
    extra: dict[str, Any] = field(default_factory=dict)
    #: started after VMs are re-adopted, stopped (in reverse) before the agent lets go of them
    background: list[Background] = field(default_factory=list)
