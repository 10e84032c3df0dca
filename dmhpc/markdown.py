"""Markdown tables and code spans, as the launchers' reports and the model card write them."""

from __future__ import annotations

import re
from typing import Iterable, Sequence


def code(value: object) -> str:
    """`value` as an inline code span that shows it whole: a backtick in it (a file name) ended the
    span early, and a line break in it ended the card's line. Fenced by one backtick more than its
    longest run of them (CommonMark), line breaks shown as \\n."""
    text = str(value).replace("\r", "\\r").replace("\n", "\\n")
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    # A space each side keeps a backtick at an end apart from the fence; CommonMark strips one
    # space each side where both are there, so a value with spaces at both ends gets them too.
    pad = " " if text[:1] == "`" or text[-1:] == "`" or (text[:1] == text[-1:] == " " and text.strip()) else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def cell(value: object) -> str:
    """A value as one table cell: a `|` in it (a method or point name, a failure's message) split
    the row into more cells than its header, and a line break ended the table."""
    return " ".join(str(value).replace("|", r"\|").splitlines()).strip()  # (\r too ends a line)


def table(header: Sequence[object], rows: Iterable[Sequence[object]]) -> list[str]:
    """The lines of a table: its header, its rule and one line per row, every cell through `cell`."""
    return [row(header), "|" + "---|" * len(header), *(row(r) for r in rows)]


def row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(cell(c) for c in cells) + " |"
