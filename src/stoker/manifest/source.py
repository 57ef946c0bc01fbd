"""One parsed manifest file: its label, its values and where each key sits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stoker.manifest.positions import KeyPath, PositionMap

if TYPE_CHECKING:
    from stoker.manifest.errors import ManifestProblem


@dataclass(frozen=True)
class SourceDocument:
    """A file's data as ``tomllib`` read it, with values already reported as unusable
    (TOML dates and times, nan, inf) replaced by ``None`` so that validation does not report
    them a second time; ``bad_paths`` are those keys and ``problems`` what was reported."""

    file: str
    data: dict[str, Any]
    positions: PositionMap
    bad_paths: frozenset[KeyPath] = field(default_factory=frozenset)
    problems: tuple[ManifestProblem, ...] = ()

    def line(self, path: KeyPath) -> int:
        return self.positions.line(path)

    def already_reported(self, path: KeyPath) -> bool:
        """True when ``path`` or one of its ancestors was reported while loading."""
        return any(path[:depth] in self.bad_paths for depth in range(len(path) + 1))
