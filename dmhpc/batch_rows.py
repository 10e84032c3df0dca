"""The rows of each domain a transfer loss needs per batch, and what the MMD's rows cost: checked
by the trainer at start and by the launchers for every point (torch-free, as the launchers are)."""

from __future__ import annotations

from dmhpc.errors import DmhpcError

CORAL_MIN_ROWS = 2
"""Rows of each domain the covariances need, in the batch they are taken of (they divide by n - 1)."""


def mmd_min_rows(unbiased: bool) -> int:
    """Rows of each domain the MMD estimator needs (the unbiased one drops the self-pairs)."""
    return 2 if unbiased else 1


def mmd_memory_gib(rows: int, element_size: int = 4) -> float:
    """GiB the MMD of `rows` rows (source + target) holds at its peak: 2.5 rows^2 elements, as
    measured by bench/mmd.py (docs/losses.md)."""
    return 2.5 * rows**2 * element_size / 2**30


def check_batch_rows(cfg, world_size: int) -> None:
    """The rows of each domain the transfer loss sees per step (all ranks' under loss.scope=global)
    against what it needs: the loss refuses them only at the first step, after the run started (a
    launcher's job after its wait in the queue)."""
    loss, batch = cfg.loss, cfg.train.batch_size
    rows = batch * (world_size if loss.scope == "global" else 1)
    where = (f"{world_size} rank{'s' if world_size > 1 else ''} x train.batch_size {batch}"
             if loss.scope == "global" else f"train.batch_size {batch} (loss.scope=local)")
    least = {"coral": CORAL_MIN_ROWS, "mmd": mmd_min_rows(loss.mmd.unbiased)}.get(loss.transfer, 1)
    if rows < least:
        what = "unbiased mmd" if loss.transfer == "mmd" else loss.transfer
        raise DmhpcError(f"loss.transfer: {what} needs at least {least} source and {least} target rows per batch; "
                         f"{where} gives {rows} of each")
    if loss.transfer == "mmd" and 2 * rows > loss.mmd.max_samples:
        raise DmhpcError(f"loss.mmd.max_samples: {where} gives {2 * rows} rows (source + target) to the MMD, more "
                         f"than {loss.mmd.max_samples}; they would need about {mmd_memory_gib(2 * rows):.1f} GiB. "
                         f"Use loss.scope=local, a smaller train.batch_size, or a larger loss.mmd.max_samples if the "
                         f"memory is there")
