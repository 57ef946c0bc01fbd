"""Errors the services raise; the API turns each into a problem+json answer."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base: ``status`` is the HTTP status, ``title`` a short summary, the message the detail."""

    status = 400
    title = "Bad request"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class NotFound(ServiceError):
    status = 404
    title = "Not found"


class Conflict(ServiceError):
    status = 409
    title = "Conflict"


class InvalidSpec(ServiceError):
    """The input parsed but cannot work here (a missing file, say); names the field."""

    status = 422
    title = "Invalid request"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}", errors=[{"field": field, "message": message}])
