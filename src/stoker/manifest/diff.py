"""Field-by-field differences of JSON-like values, with paths as a person writes them:
``labels.tier``, ``drives[0].path``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from stoker.manifest.steps import ABSENT


def differences(old: Any, new: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """``(path, old, new)`` for every leaf that differs; tables recurse key by key (new
    keys in their order, then removed ones), lists of tables by position, anything else
    is compared whole. Missing values are :data:`ABSENT`."""
    if old == new:
        return
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*new, *(k for k in old if k not in new)]:
            sub = f"{path}.{key}" if path else str(key)
            yield from differences(old.get(key, ABSENT), new.get(key, ABSENT), sub)
    elif _tables(old) and _tables(new):
        for i in range(max(len(old), len(new))):
            yield from differences(
                old[i] if i < len(old) else ABSENT,
                new[i] if i < len(new) else ABSENT,
                f"{path}[{i}]",
            )
    else:
        yield path, old, new


def _tables(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, dict) for item in value)
