"""Quota events name their VM the same way everywhere: ``"<name>: ..."`` and ``name=``.

Event consumers (the CLI's event list, reports, webhooks) rely on that shape.
"""

from __future__ import annotations

from typing import Any

from stoker.domain.events import EventType
from stoker.domain.vm import VM
from stoker.services.events import EventBus


def announce(events: EventBus, vm: VM, type: EventType, message: str, **data: Any) -> None:
    """Publish a quota event about ``vm``."""
    events.publish(type, f"{vm.name}: {message}", vm.id, name=vm.name, **data)
