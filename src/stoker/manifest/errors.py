"""Manifest errors: each names the file, the key's full path and its line.

Validation collects every problem of every file before anything is reported, so an operator
fixes a manifest in one round instead of one error per run.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from stoker.manifest.positions import KeyPath
from stoker.manifest.source import SourceDocument

_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True, order=True)
class ManifestProblem:
    """One thing to fix. ``line`` 0 means the file as a whole (it could not be read)."""

    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "path": self.path, "message": self.message}


class ManifestError(Exception):
    """Every problem of a manifest, sorted by file and line."""

    def __init__(self, problems: Iterable[ManifestProblem]) -> None:
        self.problems: tuple[ManifestProblem, ...] = tuple(sorted(set(problems)))
        super().__init__(self.render())

    def render(self) -> str:
        count = len(self.problems)
        head = f"the manifest has {count} problem{'s' if count != 1 else ''}; nothing was changed"
        return "\n".join([head, *(f"  {p}" for p in self.problems)])

    def to_dict(self) -> dict[str, Any]:
        return {"problems": [p.to_dict() for p in self.problems]}


def format_path(data: Mapping[str, Any], path: KeyPath) -> str:
    """``("vm", 0, "quota", "cpu")`` -> ``vm[web].quota.cpu``: entries of an array by their
    ``name`` when they have one, else by index."""
    out = ""
    node: Any = data
    for part in path:
        if isinstance(part, int):
            element = node[part] if isinstance(node, list) and 0 <= part < len(node) else None
            name = element.get("name") if isinstance(element, dict) else None
            if isinstance(name, str) and name:
                out += f"[{name}]" if _PLAIN_NAME.fullmatch(name) else f"[{json.dumps(name)}]"
            else:
                out += f"[{part}]"
            node = element
        else:
            key = part if _PLAIN_KEY.fullmatch(part) else json.dumps(part)
            out += f".{key}" if out else key
            node = node.get(part) if isinstance(node, dict) else None
    return out


def did_you_mean(word: str, known: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for a near miss or a shortened name, else the known names."""
    close = difflib.get_close_matches(word, known, n=1, cutoff=0.75)
    if not close and len(word) >= 3:
        close = [k for k in known if k.startswith(word) or word.startswith(k)][:1]
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (known: {', '.join(known)})" if 0 < len(known) <= 8 else ""


class Collector:
    """Gathers problems; the caller raises :class:`ManifestError` once at the end."""

    def __init__(self, problems: Iterable[ManifestProblem] = ()) -> None:
        self.problems: list[ManifestProblem] = list(problems)

    def add(self, doc: SourceDocument, path: KeyPath, message: str, again: bool = False) -> None:
        """Add a problem, unless loading already reported this key's value (``again``: even
        then, for a problem of another kind)."""
        if not again and doc.already_reported(path):
            return
        shown = format_path(doc.data, path)
        self.problems.append(ManifestProblem(doc.file, doc.line(path), shown, message))

    def where(self, doc: SourceDocument, path: KeyPath) -> str:
        """``file:line`` of a key, for messages that point at a second place."""
        line = doc.line(path)
        return f"{doc.file}:{line}" if line else doc.file

    def raise_if_any(self) -> None:
        if self.problems:
            raise ManifestError(self.problems)
