"""What ``vm create`` and ``cluster vm create`` share: a spec from a file, the test guest, and
the ``--forward`` and ``--drive`` values, each unusable input one line saying what to fix."""

from __future__ import annotations

import json
import math
import tomllib
from datetime import date, datetime, time
from pathlib import Path
from typing import Any

from stoker.cli.common import fail


def spec_from_file(path: Path) -> dict[str, Any]:
    """The spec table of a TOML or JSON file; every way the file can be unusable is one
    line naming it (and the key, for a value no spec field can hold)."""
    kind = "JSON" if path.suffix == ".json" else "TOML"
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise fail(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise fail(f"{path} is not UTF-8 text (byte {exc.start} is not valid)") from None
    try:
        spec = (
            json.loads(text, parse_constant=_refuse_constant)
            if kind == "JSON"
            else (tomllib.loads(text))
        )
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise fail(f"{path} is not valid {kind}: {exc}") from None
    if not isinstance(spec, dict):
        raise fail(f"{path} must hold a {kind} object (a table of spec fields), not {spec!r}")
    problem = _unusable_value(spec)
    if problem is not None:
        raise fail(f"{path}: {problem}")
    return spec


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a spec can hold")


def _unusable_value(value: Any, where: str = "") -> str | None:
    """What no spec field accepts and JSON cannot carry: NaN, infinity, TOML dates and
    times; None when everything is usable."""
    if isinstance(value, dict):
        for key, item in value.items():
            found = _unusable_value(item, f"{where}.{key}" if where else str(key))
            if found:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _unusable_value(item, f"{where}[{index}]")
            if found:
                return found
    elif isinstance(value, float) and not math.isfinite(value):
        return f"{where} is {value}: give a finite number"
    elif isinstance(value, datetime | date | time):
        return f"{where} is a date or time ({value}); spec fields take numbers and strings"
    return None


def parse_forward(text: str) -> dict[str, Any]:
    host, sep, guest = text.partition(":")
    if not sep or not host.isdigit() or not guest.isdigit():
        raise fail(f"--forward {text!r}: expected HOST_PORT:GUEST_PORT, for example 8080:80")
    return {"host_port": int(host), "guest_port": int(guest)}


def parse_drive(text: str) -> dict[str, Any]:
    path, *opts = text.split(",")
    drive: dict[str, Any] = {"path": str(Path(path).absolute())}
    for opt in opts:
        if opt in ("raw", "qcow2"):
            drive["format"] = opt
        elif opt in ("ro", "readonly"):
            drive["read_only"] = True
        else:
            raise fail(f"--drive {text!r}: unknown option {opt!r} (use raw, qcow2 or ro)")
    return drive


def add_test_guest(spec: dict[str, Any]) -> None:
    """``--guest``: the test guest's kernel, initrd, command line and ready marker, for what
    the spec does not say itself."""
    from stoker.guest.build import find_guest

    image = find_guest()
    if image is None:
        raise fail("the test guest is not built: run `stoker guest build` first")
    spec.setdefault("kernel", str(image.kernel))
    spec.setdefault("initrd", str(image.initrd))
    spec.setdefault("cmdline", image.cmdline)
    spec.setdefault("ready_marker", image.ready_marker)
