"""Listing tables that never hide what an operator has to type.

Ids and names ("key" columns) are always shown whole: they get the width of their longest
cell and never wrap or shorten. The other columns give way first: they fold onto more
lines, and columns marked ``wide`` appear only with ``--wide``, which prints every column
at its full width whatever the terminal (lines may then be longer than the screen).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import typer
from rich.console import Console, JustifyMethod
from rich.table import Table
from rich.text import Text

from stoker.cli.common import out

WIDE_OPTION = typer.Option(
    False, "--wide", "-w", help="Every column, nothing shortened (lines may be long)."
)

#: the width a --wide table is laid out in: wide enough that no cell ever folds
UNBOUNDED = 10_000


@dataclass(frozen=True)
class Column:
    header: str
    #: an id or a name: shown whole, never wrapped or shortened
    key: bool = False
    #: shown only with --wide
    wide: bool = False
    justify: JustifyMethod = "left"


def _cell_width(cell: str) -> int:
    return max((Text.from_markup(line).cell_len for line in cell.splitlines()), default=0)


def listing(columns: Sequence[Column], rows: Iterable[Sequence[str]], wide: bool) -> Table:
    """A table of ``rows`` (one cell per column, Rich markup allowed) for ``columns``."""
    shown = [i for i, c in enumerate(columns) if wide or not c.wide]
    cells = [[row[i] for i in shown] for row in rows]
    table = Table(box=None, pad_edge=False, header_style="bold")
    for position, index in enumerate(shown):
        column = columns[index]
        if column.key:
            longest = max(
                [len(column.header), *(_cell_width(r[position]) for r in cells)], default=0
            )
            table.add_column(
                column.header,
                justify=column.justify,
                no_wrap=True,
                min_width=longest,
                overflow="ignore",
            )
        else:
            table.add_column(column.header, justify=column.justify, overflow="fold", no_wrap=wide)
    for row in cells:
        table.add_row(*row)
    return table


def print_listing(
    columns: Sequence[Column],
    rows: Iterable[Sequence[str]],
    wide: bool,
    empty: str | None = None,
    console: Console | None = None,
) -> None:
    """Print the listing (``empty`` instead when there are no rows and it is given)."""
    rows = list(rows)
    target = console or out
    if not rows and empty is not None:
        target.print(empty, highlight=False)
        return
    table = listing(columns, rows, wide)
    if not wide:
        target.print(table)
        return
    # laid out at full width; the terminal wraps long lines. The console's own setting (None:
    # follow the terminal) is put back, not the width it computed now: rich has no public way
    # to widen one print, and pinning a computed width would outlive this command.
    saved = target._width
    target.width = UNBOUNDED
    try:
        target.print(table, crop=False)
    finally:
        target._width = saved
