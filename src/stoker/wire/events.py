"""Events as the API and its live stream show them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict


class EventOut(BaseModel):
    # validated straight from an Event record: same fields
    model_config = ConfigDict(from_attributes=True)

    id: int
    at: datetime
    vm_id: str | None
    type: str
    message: str
    data: dict[str, Any]
