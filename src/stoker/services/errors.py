"""Errors the services raise; the API turns each into a problem+json answer."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base: ``status`` is the HTTP status, ``title`` a short summary, the message the detail."""

    status = 400
    title = "Bad request"

    def __init__(self, detail: str, **members: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        #: problem+json extension members (RFC 9457): ``errors``, ``resource``, ...
        self.members = members


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


class StartVeto(Exception):
    """Raised by a start guard that refuses a start (a vetoing hook, a quota misfit); the
    lifecycle answers it with a 409 naming who refused."""


class NetworkError(Exception):
    """A VM's network could not be made ready (a TAP, an address, a rule); the message says
    what failed. At start it puts the VM in error with that reason."""
