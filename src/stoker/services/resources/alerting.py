"""Threshold alerts on what VMs really use, raised and cleared as events.

Thresholds have hysteresis (``domain.alerts``), so a value hovering at the line does not
flap; an unmeasured value (NaN) neither raises nor clears.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from stoker.domain import alerts
from stoker.domain.capacity import NodeCapacity
from stoker.domain.events import EventType
from stoker.domain.usage import NodeSample
from stoker.services.events import EventBus
from stoker.services.resources.config import ResourcesConfig

#: what each alert measures, as its messages say it
MEASURES = {"cpu": "CPU used by VMs", "memory": "memory used by VMMs"}


@dataclass(frozen=True)
class AlertView:
    resource: str
    active: bool
    since: datetime | None
    value: float | None
    raise_at: float
    clear_at: float


def used_fractions(node: NodeSample, cap: NodeCapacity) -> dict[str, float]:
    """CPU and memory used by VMMs as fractions of capacity; NaN when not measured."""
    return {
        "cpu": node.cpu_used / cap.physical_cpus if node.cpu_used is not None else math.nan,
        "memory": (
            node.memory_used / cap.memory_limit_bytes
            if node.memory_used is not None and cap.memory_limit_bytes > 0
            else math.nan
        ),
    }


class UsageAlerts:
    """The state of the CPU and memory alerts between sweeps."""

    def __init__(self, cfg: ResourcesConfig, events: EventBus) -> None:
        self.events = events
        self.thresholds = {
            "cpu": alerts.Threshold.at("cpu", cfg.cpu_alert, cfg.alert_hysteresis),
            "memory": alerts.Threshold.at("memory", cfg.memory_alert, cfg.alert_hysteresis),
        }
        self.states: dict[str, alerts.AlertState] = {k: alerts.INACTIVE for k in self.thresholds}
        self.values: dict[str, float | None] = {k: None for k in self.thresholds}

    def evaluate(self, node: NodeSample, cap: NodeCapacity, now: datetime) -> None:
        """Fold in one node sample; publish ``alert.raised`` / ``alert.cleared`` on a change."""
        values = used_fractions(node, cap)
        for resource, threshold in self.thresholds.items():
            value = values[resource]
            self.values[resource] = None if math.isnan(value) else value
            state, change = alerts.evaluate(threshold, self.states[resource], value, now)
            self.states[resource] = state
            if change is None:
                continue
            what = MEASURES[resource]
            if change == "raised":
                message = f"{what} at {value:.0%} of capacity, at or above {threshold.raise_at:.0%}"
            else:
                message = f"{what} back to {value:.0%} of capacity, below {threshold.clear_at:.0%}"
            self.events.publish(
                EventType.ALERT_RAISED if change == "raised" else EventType.ALERT_CLEARED,
                message,
                resource=resource,
                value=round(value, 4),
                raise_at=threshold.raise_at,
                clear_at=threshold.clear_at,
            )

    def views(self) -> list[AlertView]:
        return [
            AlertView(
                resource=name,
                active=self.states[name].active,
                since=self.states[name].since,
                value=self.values[name],
                raise_at=threshold.raise_at,
                clear_at=threshold.clear_at,
            )
            for name, threshold in self.thresholds.items()
        ]
