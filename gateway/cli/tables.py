"""Tables for the command line: boxed on a terminal, tab-separated when piped."""

from __future__ import annotations

from collections.abc import Sequence


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, empty: str) -> None:
    """Print rows under a header, or `empty` when there are none."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False)
    if not rows:
        console.print(empty)
    elif console.is_terminal:
        table = Table(*header)
        for row in rows:
            table.add_row(*(Text(cell) for cell in row))
        console.print(table)
    else:
        # Tab-separated when piped: a wrapped box table is useless to grep and cut.
        print("\n".join("\t".join(row) for row in [header, *rows]))
