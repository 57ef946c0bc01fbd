"""Pydantic's errors as manifest problems: the path into the file and a message that says
what to write instead (an unknown key gets the closest known key)."""

from __future__ import annotations

import json
import types
from enum import Enum
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from stoker.manifest.errors import Collector, did_you_mean
from stoker.manifest.positions import KeyPath
from stoker.manifest.source import SourceDocument


def validate(
    model: type[BaseModel], data: Any, collector: Collector, doc: SourceDocument, base: KeyPath
) -> Any:
    """``model`` validated from ``data`` as the API validates JSON, but strict: TOML has types,
    so ``memory_mib = "4096"`` is a mistake to report, not a string to coerce. ``None`` (and
    problems in ``collector``) when it fails."""
    try:
        return model.model_validate_json(json.dumps(data), strict=True)
    except ValidationError as exc:
        report(exc, model, collector, doc, base)
        return None


def report(
    exc: ValidationError,
    model: type[BaseModel],
    collector: Collector,
    doc: SourceDocument,
    base: KeyPath,
) -> None:
    for error in exc.errors():
        raw_loc = tuple(p for p in error["loc"] if isinstance(p, int | str))
        loc, annotation = walk(model, raw_loc)
        # an unknown key is worth saying even where loading already reported its value
        again = error["type"] == "extra_forbidden"
        collector.add(doc, (*base, *loc), message(error, model, raw_loc, annotation), again)


def message(error: Any, model: type[BaseModel], raw_loc: KeyPath, annotation: Any) -> str:
    """What to fix; ``raw_loc`` is pydantic's, union members included."""
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        _, parent = walk(model, raw_loc[:-1])
        known = list(parent.model_fields) if _is_model(parent) else []
        return f"unknown key {raw_loc[-1]!r}" + did_you_mean(str(raw_loc[-1]), known)
    if kind == "missing":
        return "is required"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        key = str(ctx.get("discriminator", "kind")).strip("'")
        tags = ", ".join(_tags(annotation))
        if kind == "union_tag_not_found":
            return f"needs a {key!r} ({tags})"
        return f"unknown {key} {ctx.get('tag')!r}; use one of: {tags}"
    text = str(error["msg"]).removeprefix("Value error, ")
    given = error.get("input")
    if isinstance(given, str | int | float | bool) and kind != "value_error":
        text += f" (got {json.dumps(given)})"
    return text


def walk(model: type[BaseModel], loc: KeyPath) -> tuple[KeyPath, Any]:
    """``loc`` without the union members pydantic names in it (``probes.0.http.url`` is
    ``probes[0].url`` in the file), and the annotation found at its end."""
    annotation: Any = model
    out: list[str | int] = []
    for part in loc:
        annotation = _unwrap(annotation)
        member = _member(annotation, part)
        if member is not None:
            annotation = member
            continue
        out.append(part)
        if isinstance(part, int) or get_origin(annotation) is dict:
            args = get_args(annotation)
            annotation = args[-1] if args else Any
        elif _is_model(annotation) and part in annotation.model_fields:
            annotation = annotation.model_fields[part].annotation
        else:
            annotation = Any
    return tuple(out), _unwrap(annotation)


def _unwrap(annotation: Any) -> Any:
    """``Annotated[X, ...]`` and ``X | None`` -> ``X``."""
    while True:
        if get_origin(annotation) is Annotated:
            annotation = get_args(annotation)[0]
        elif get_origin(annotation) in (Union, types.UnionType):
            rest = [a for a in get_args(annotation) if a is not type(None)]
            if len(rest) != 1:
                return annotation
            annotation = rest[0]
        else:
            return annotation


def _union_members(annotation: Any) -> list[type[BaseModel]]:
    if get_origin(annotation) not in (Union, types.UnionType):
        return []
    members = [a for a in get_args(annotation) if a is not type(None)]
    return members if all(_is_model(m) for m in members) else []


def _member(annotation: Any, part: str | int) -> type[BaseModel] | None:
    """The union member a loc part names, by its tag or its class name."""
    for member in _union_members(annotation):
        if part == member.__name__ or part in _literal_values(member):
            return member
    return None


def _literal_values(model: type[BaseModel]) -> list[str]:
    values = []
    for field in model.model_fields.values():
        if get_origin(field.annotation) is Literal:
            values += [
                v.value if isinstance(v, Enum) else str(v) for v in get_args(field.annotation)
            ]
    return values


def _tags(annotation: Any) -> list[str]:
    return [tag for member in _union_members(annotation) for tag in _literal_values(member)]


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)
