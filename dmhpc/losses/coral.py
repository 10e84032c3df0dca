"""Deep CORAL: the distance between source and target feature covariances."""

from __future__ import annotations

import torch

from dmhpc.batch_rows import CORAL_MIN_ROWS as MIN_ROWS
from dmhpc.errors import DmhpcError
from dmhpc.losses.collective import all_reduce_sum, is_global
from dmhpc.losses.precision import full_precision, upcast


def coral(fs: torch.Tensor, ft: torch.Tensor, scope: str = "global") -> torch.Tensor:
    """||C_s - C_t||_F^2 / (4 d^2) with unbiased (1/(n-1)) covariances, as in Deep CORAL.

    (The original DeepMerge code used the plain mean of the squared differences, i.e. 4x this.)
    scope="global" uses the covariances of the batch of all ranks (exact under DDP; each rank
    sends a d x d matrix per domain), "local" those of this rank's batch. Computes in float32 at
    least, outside autocast. Returns a 0-d tensor.

    Under "global" a rank may hold no rows: it is checked on its own, with no wait for the others
    (a refusal on one rank before the collectives left the others in them forever). A global batch
    of fewer than 2 rows per domain gives a non-finite loss (counted on the device, with no host
    wait in the step); the trainer refuses such batches at its start.
    """
    if fs.ndim != 2 or ft.ndim != 2 or fs.shape[1] != ft.shape[1]:
        raise DmhpcError(
            f"coral: features must be (n, d) and (m, d) with the same d; got {tuple(fs.shape)} and {tuple(ft.shape)}"
        )
    glob = is_global(scope)
    if not glob and (fs.shape[0] < MIN_ROWS or ft.shape[0] < MIN_ROWS):
        raise DmhpcError(
            f"coral: needs at least {MIN_ROWS} source and {MIN_ROWS} target rows per batch; "
            f"got {fs.shape[0]} and {ft.shape[0]}"
        )
    with full_precision(fs.device):
        fs, ft = upcast(fs, ft)
        d = fs.shape[1]
        cs, ct = _covariance(fs, glob), _covariance(ft, glob)
        # Scaled before it is squared: features of ~1e10 overflowed float32 in the square (inf, then
        # NaN), where the scaled loss was finite.
        return ((cs - ct) / (2 * d)).square().sum()


def _covariance(x: torch.Tensor, glob: bool) -> torch.Tensor:
    # Centring on the (detached) mean before the product keeps float32 exact for features with
    # large means. The mean needs no gradient: the scatter's derivative with respect to it is
    # -2 sum_i (x_i - mean) = 0.
    with torch.no_grad():
        stats = torch.cat([x.sum(dim=0), x.new_full((1,), x.shape[0])])  # no copy from the host
        if glob:
            torch.distributed.all_reduce(stats)
        mean, count = stats[:-1] / stats[-1], stats[-1]
    y = x - mean
    scatter = y.T @ y
    if glob:
        scatter = all_reduce_sum(scatter)
    # Fewer than 2 rows: NaN, as promised, for none too (0 / -1 was a finite covariance of 0).
    return scatter / torch.where(count >= 2, count - 1, torch.nan)
