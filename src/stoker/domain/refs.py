"""Finding a record by a unique prefix of its id, as git and docker do.

An operator reads an id from a table and types its start; a prefix that fits several
records is an error that lists them, never a guess. Prefixes shorter than
``MIN_PREFIX`` are not tried: a mistyped name of two or three letters must not quietly hit
some id that happens to start with them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

#: the shortest prefix tried (git's shortest abbreviation)
MIN_PREFIX = 4


@dataclass(frozen=True)
class Candidate:
    """A record a prefix may name: its id and what a person knows it by."""

    id: str
    label: str


class AmbiguousPrefix(Exception):
    """``prefix`` starts more than one id; ``candidates`` are all of them, sorted by id."""

    def __init__(self, prefix: str, candidates: list[Candidate]) -> None:
        super().__init__(prefix)
        self.prefix = prefix
        self.candidates = candidates


def unique_prefix(prefix: str, candidates: Iterable[Candidate]) -> str | None:
    """The one id that starts with ``prefix``; None when none does (or the prefix is too
    short to try); AmbiguousPrefix when several do."""
    if len(prefix) < MIN_PREFIX:
        return None
    found = sorted((c for c in candidates if c.id.startswith(prefix)), key=lambda c: c.id)
    if len(found) > 1:
        raise AmbiguousPrefix(prefix, found)
    return found[0].id if found else None
