"""Threshold alerts with hysteresis.

An alert raises when usage reaches raise_at and clears only when it falls below clear_at, a
little lower, so a value hovering around the threshold raises once instead of flapping on
every check. The clock is a parameter: `now` is only recorded, never read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

#: The default gap between raising and clearing.
DEFAULT_HYSTERESIS = 0.05

AlertEvent = Literal["raised", "cleared"]


@dataclass(frozen=True)
class Threshold:
    """Raise at raise_at (a fraction of capacity), clear below clear_at (<= raise_at)."""

    resource: str
    raise_at: float
    clear_at: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.raise_at) and math.isfinite(self.clear_at)):
            raise ValueError("alert thresholds must be finite fractions")
        if not 0 <= self.clear_at <= self.raise_at:
            raise ValueError(
                f"{self.resource}: need 0 <= clear_at <= raise_at, "
                f"got clear_at={self.clear_at}, raise_at={self.raise_at}"
            )

    @classmethod
    def at(
        cls, resource: str, raise_at: float, hysteresis: float = DEFAULT_HYSTERESIS
    ) -> Threshold:
        """A threshold that clears `hysteresis` below where it raises."""
        return cls(resource, raise_at, max(0.0, raise_at - hysteresis))


#: The seed's thresholds: 80% CPU, 90% memory.
DEFAULT_THRESHOLDS: dict[str, Threshold] = {
    "cpu": Threshold.at("cpu", 0.80),
    "memory": Threshold.at("memory", 0.90),
}


@dataclass(frozen=True)
class AlertState:
    """Whether the alert is active, and since when it has been in that state."""

    active: bool = False
    since: datetime | None = None


INACTIVE = AlertState()


def evaluate(
    threshold: Threshold, state: AlertState, value_fraction: float, now: datetime
) -> tuple[AlertState, AlertEvent | None]:
    """The next state and the event to report, if any.

    Raises when an inactive alert sees value >= raise_at; clears when an active one sees
    value < clear_at; otherwise nothing changes. A NaN value (no reading) changes nothing.
    """
    if math.isnan(value_fraction):
        return state, None
    if not state.active and value_fraction >= threshold.raise_at:
        return AlertState(active=True, since=now), "raised"
    if state.active and value_fraction < threshold.clear_at:
        return AlertState(active=False, since=now), "cleared"
    return state, None
