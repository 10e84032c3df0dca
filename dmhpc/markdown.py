"""Markdown tables, as the launchers' reports and the model card write them."""

from __future__ import annotations

from typing import Iterable, Sequence


def cell(value: object) -> str:
    """A value as one table cell: a `|` in it (a method or point name, a failure's message) split
    the row into more cells than its header, and a line break ended the table."""
    return " ".join(str(value).replace("|", r"\|").split("\n")).strip()


def table(header: Sequence[object], rows: Iterable[Sequence[object]]) -> list[str]:
    """The lines of a table: its header, its rule and one line per row, every cell through `cell`."""
    return [row(header), "|" + "---|" * len(header), *(row(r) for r in rows)]


def row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(cell(c) for c in cells) + " |"
