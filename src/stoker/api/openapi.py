"""The OpenAPI document, completed: links from each create to the operations on what it
created, and the constraints the API enforces stated where a client (or a fuzzer) can read
them.

Links follow one rule plus three specifics. The rule: a ``POST`` on a collection (``/x``)
answering 201 links to every operation under ``/x/{param}`` with ``param`` taken from the
created object's ``id`` (VMs, schedules, networks). The specifics: a snapshot is created
under its VM but lives at ``/api/v1/snapshots/{snapshot_id}``; an automatic snapshot's id is
inside the answer; a report is fetched by the label it was written under; a restore into a
new VM answers that VM.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from stoker.domain.spec import NAME_PATTERN

#: a VM, schedule or network by id (hex) or name
REF_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
#: the one duration grammar (domain.units.parse_duration), as a pattern
DURATION_PATTERN = r"^\s*(\d+(\.\d+)?\s*(w|d|h|m|s|ms)?\s*)+$"
RETENTION_PATTERN = (
    r"^\s*((last|hourly|daily|weekly|monthly|yearly)\s*:\s*\d+|within\s*:\s*[0-9a-z. ]+)"
    r"(\s*,\s*((last|hourly|daily|weekly|monthly|yearly)\s*:\s*\d+|within\s*:\s*[0-9a-z. ]+))*"
    r"\s*$"
)

_SNAPSHOT_OPS = "/api/v1/snapshots/{snapshot_id}"


def install(app: FastAPI) -> None:
    """Serve the completed document (built once, like FastAPI's own)."""
    build: Callable[[], dict[str, Any]] = app.openapi

    def completed() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = complete(build())
        return app.openapi_schema

    app.openapi = completed  # type: ignore[method-assign]


def complete(doc: dict[str, Any]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = doc.get("paths", {})
    _constrain(paths, doc.get("components", {}).get("schemas", {}))
    for path, ops in paths.items():
        create = ops.get("post")
        if create is None or "201" not in create.get("responses", {}):
            continue
        if "{" not in path:  # a collection: /api/v1/vms, /api/v1/schedules, ...
            _link_children(paths, create, path, "$response.body#/id")
    _link(paths, ("post", "/api/v1/vms/{ref}/snapshots"), _SNAPSHOT_OPS, "$response.body#/id")
    _link(
        paths,
        ("post", "/api/v1/vms/{ref}/snapshots/auto"),
        _SNAPSHOT_OPS,
        "$response.body#/snapshot/id",
    )
    _link(
        paths,
        ("post", "/api/v1/reports/{period}"),
        "/api/v1/reports/{label}",
        "$response.body#/label",
    )
    restore = paths.get(f"{_SNAPSHOT_OPS}/restore", {}).get("post")
    if restore is not None:
        _link_children(paths, restore, "/api/v1/vms", "$response.body#/vm/id", status="200")
    return doc


def _targets(
    paths: dict[str, dict[str, Any]], base: str, only: str | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """Operations on one object under ``base``: ``base/{p}`` and below (``only``: that
    parameter's name)."""
    param = re.escape(f"{{{only}}}") if only else r"\{[a-z_]+\}"
    pattern = re.compile(re.escape(base) + "/" + param + r"(/|$)")
    return [
        (path, op)
        for path, ops in paths.items()
        if pattern.match(path)
        for op in ops.values()
        if isinstance(op, dict) and "operationId" in op
    ]


def _link_children(
    paths: dict[str, dict[str, Any]],
    source: dict[str, Any],
    base: str,
    value: str,
    status: str = "201",
    only: str | None = None,
) -> None:
    links = source["responses"][status].setdefault("links", {})
    for path, op in _targets(paths, base, only):
        param = re.match(re.escape(base) + r"/\{([a-z_]+)\}", path)
        assert param is not None
        links[op["operationId"]] = {
            "operationId": op["operationId"],
            "parameters": {param.group(1): value},
        }


def _link(
    paths: dict[str, dict[str, Any]], source: tuple[str, str], target: str, value: str
) -> None:
    op = paths.get(source[1], {}).get(source[0])
    if op is None:
        return
    base, _, last = target.rpartition("/")
    status = "201" if "201" in op["responses"] else "200"
    _link_children(paths, op, base, value, status, only=last.strip("{}"))


def _constrain(paths: dict[str, dict[str, Any]], schemas: dict[str, Any]) -> None:
    """What the API checks, said in the schema: names and ids, durations, retention rules
    (the code checks the same, and says more when it refuses). A report's period and label
    stay plain strings: ``/api/v1/reports/{period}`` (POST) and ``{label}`` (GET) share their
    paths, and constraining either makes the other method look undeclared there."""
    for ops in paths.values():
        for op in ops.values():
            for param in op.get("parameters", []) if isinstance(op, dict) else []:
                schema = param.setdefault("schema", {})
                name = param.get("name")
                if param.get("in") == "path" and name == "ref":
                    schema.setdefault("pattern", REF_PATTERN)
                    schema.setdefault("maxLength", 64)
                elif param.get("in") == "query" and name in ("duration",):
                    schema.setdefault("pattern", DURATION_PATTERN)
    policy = schemas.get("PolicyIn", {}).get("properties", {})
    _nullable_pattern(policy.get("retention"), RETENTION_PATTERN)
    _nullable_pattern(policy.get("interval"), DURATION_PATTERN)
    restore = schemas.get("RestoreRequest", {}).get("properties", {})
    _nullable_pattern(restore.get("as"), NAME_PATTERN)


def _nullable_pattern(schema: dict[str, Any] | None, pattern: str) -> None:
    if schema is None:
        return
    for option in schema.get("anyOf", [schema]):
        if option.get("type") == "string":
            option.setdefault("pattern", pattern)
