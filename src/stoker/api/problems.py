"""Errors as RFC 9457 problem+json, with a message a person can act on.

Every route declares these answers so the OpenAPI document tells clients (and schemathesis)
the truth about them.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from stoker.domain.capabilities import Unsupported
from stoker.domain.states import IllegalAction
from stoker.services.errors import ServiceError

PROBLEM = "application/problem+json"

log = logging.getLogger("stoker.api")


class FieldError(BaseModel):
    field: str
    message: str


class Problem(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    errors: list[FieldError] | None = None
    current_state: str | None = None
    allowed_actions: list[str] | None = None
    alternative: str | None = None


def problem_body(status: int, title: str, detail: str) -> bytes:
    """A bare problem+json document, for answers given outside FastAPI (the body limit)."""
    return json.dumps(
        {"type": "about:blank", "title": title, "status": status, "detail": detail}
    ).encode()


def _problem_response(
    status: int,
    title: str,
    detail: str,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    body.update({k: v for k, v in extra.items() if v is not None})
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def _content(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "model": Problem,
        "content": {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


#: Declared on every router: what can go wrong, as problem+json.
PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _content("Malformed request (for example, a body that is not JSON)"),
    401: _content("Missing or wrong bearer token (TCP listener only)"),
    404: _content("No such resource"),
    409: _content("The request conflicts with the resource's current state"),
    413: _content("The request body is larger than the agent accepts (api.max_body_bytes)"),
    422: _content("The request is well-formed but names invalid values"),
}


def _field(loc: tuple[Any, ...]) -> str:
    parts = [p for p in loc if p not in ("body", "query", "path")]
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text or "body"


def _clean(message: str) -> str:
    return message.removeprefix("Value error, ")


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def install(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return _problem_response(exc.status, exc.title, exc.detail, **exc.members)

    @app.exception_handler(Unsupported)
    async def unsupported(_: Request, exc: Unsupported) -> JSONResponse:
        return _problem_response(
            422, "Not supported for this VM", str(exc), alternative=exc.alternative
        )

    @app.exception_handler(IllegalAction)
    async def illegal_action(_: Request, exc: IllegalAction) -> JSONResponse:
        return _problem_response(
            409,
            "Action not allowed in this state",
            str(exc),
            current_state=exc.current.value,
            allowed_actions=[a.value for a in exc.allowed],
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            detail = "; ".join(str(e.get("ctx", {}).get("error", e["msg"])) for e in errors)
            return _problem_response(
                400, "Malformed JSON", f"the request body is not valid JSON: {detail}"
            )
        fields = [{"field": _field(tuple(e["loc"])), "message": _clean(e["msg"])} for e in errors]
        detail = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
        return _problem_response(422, "Invalid request", detail, errors=fields)

    @app.exception_handler(sqlite3.OperationalError)
    async def database_error(_: Request, exc: sqlite3.OperationalError) -> JSONResponse:
        if "full" in str(exc):  # SQLITE_FULL: the data dir's file system has no space left
            return _problem_response(
                507,
                "Insufficient Storage",
                "the agent's data disk is full, so it cannot record anything: free space "
                f"on the file system of its data dir and retry ({exc})",
            )
        log.exception("database error while serving a request")
        return _problem_response(500, "Internal error", f"the agent's database failed: {exc}")

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error while serving a request")
        return _problem_response(
            500, "Internal error", f"the agent failed unexpectedly ({type(exc).__name__}: {exc})"
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names only the first route that matched the path; RFC 9110 wants all
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return _problem_response(exc.status_code, str(exc.detail), str(exc.detail), headers=headers)
