"""Resolving an id prefix for a service, with the 409 that lists the candidates."""

from __future__ import annotations

from collections.abc import Iterable

from stoker.domain.refs import AmbiguousPrefix, Candidate, unique_prefix
from stoker.services.errors import Conflict

#: how many candidates an ambiguous answer names in its message (all are in ``candidates``)
SHOWN = 10


class AmbiguousRef(Conflict):
    """A prefix that starts several ids; the answer's ``candidates`` member lists them."""

    title = "Ambiguous id prefix"


def by_prefix(kind: str, ref: str, candidates: Iterable[Candidate]) -> str | None:
    """The id of the one ``kind`` whose id starts with ``ref``, or None; AmbiguousRef (409)
    naming every candidate when several do."""
    try:
        return unique_prefix(ref, candidates)
    except AmbiguousPrefix as exc:
        names = ", ".join(f"{c.id} ({c.label})" for c in exc.candidates[:SHOWN])
        more = len(exc.candidates) - SHOWN
        raise AmbiguousRef(
            f"{ref!r} starts the ids of {len(exc.candidates)} {kind}s: {names}"
            + (f" and {more} more" if more > 0 else "")
            + "; type more of the id",
            candidates=[{"id": c.id, "name": c.label} for c in exc.candidates],
        ) from None
