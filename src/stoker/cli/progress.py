"""Progress for work the agent answers only when done (snapshots, verification, boots).

A spinner with the elapsed time on stderr, so stdout stays clean for ``--json`` and pipes;
nothing at all when stderr is not a terminal or the caller asks for quiet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from stoker.cli.common import err

T = TypeVar("T")


@contextmanager
def working(what: str, quiet: bool = False) -> Iterator[Callable[[str], None]]:
    """A spinner saying ``what`` while the block runs; yields a function that replaces the
    text (for work that reports its steps, such as the guest build)."""
    if quiet:
        yield lambda _text: None
        return
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as progress:
        task = progress.add_task(what, total=None)
        yield lambda text: progress.update(task, description=text)


def run(what: str, quiet: bool, call: Callable[[], T]) -> T:
    """``call()`` under a spinner saying ``what``."""
    with working(what, quiet):
        return call()
