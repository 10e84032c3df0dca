"""Progress bars: tqdm on the talking rank when stderr is a terminal; silent in logs and batch jobs."""

from __future__ import annotations

from tqdm import tqdm


def progress_bar(total: int, what: str, *, unit: str = "step", show: bool = True, leave: bool = False) -> tqdm:
    """A bar with count, rate and ETA. `show`: whether this process talks at all (rank 0); even
    then the bar stays off unless stderr is a terminal, so job logs hold no carriage returns."""
    return tqdm(total=total, desc=what, unit=unit, leave=leave, dynamic_ncols=True, disable=None if show else True)
