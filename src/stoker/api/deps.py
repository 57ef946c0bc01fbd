"""How a route reaches the agent's services."""

from __future__ import annotations

from fastapi import Request

from stoker.services.container import Services


def services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]
