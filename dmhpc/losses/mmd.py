"""Maximum mean discrepancy with a sum of Gaussian kernels (DeepMerge II's transfer loss).

Kernel convention kept from the original: k(x, y) = sum over sigma of exp(-||x - y||^2 / (2 sigma)),
so each sigma acts as a *variance* (the bandwidth is sqrt(sigma)).

Numerics: squared distances come from the Gram matrix of the features centred on their common
mean, in float64, with the squared norms read off the Gram diagonal. Centring removes the cancellation of
||x||^2 + ||y||^2 - 2 x.y for features with large norms, and taking the norms from the same
matmul makes every self-distance exactly zero, which the kernels with tiny sigma need (a
separately computed norm leaves ~1e-3 on the diagonal and exp(-1e-3 / 2e-6) = 0 instead of 1:
the 4-6 % float32 error of the textbook expansion). A custom backward keeps only the distance
matrices, so memory does not grow with the number of kernels.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from dmhpc.batch_rows import mmd_memory_gib as memory_gib, mmd_min_rows as min_rows
from dmhpc.config import MMDConfig
from dmhpc.errors import DmhpcError
from dmhpc.losses.collective import all_gather_rows, is_global
from dmhpc.losses.precision import full_precision, upcast

DEEPMERGE_SIGMAS: tuple[float, ...] = (
    1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1, 5, 10, 15, 20, 25, 30, 35, 100, 1e3, 1e4, 1e5, 1e6,
)  # fmt: skip
"""The original's 19 kernel variances (sigma enters as exp(-d^2 / (2 sigma)))."""

MIN_SIGMA = 1e-30
"""The narrowest kernel variance taken: 1 / (2 sigma) of one below 1.5e-39 is inf in float32, and a
self-distance of 0 times it NaN (a loss not finite at the first step, "lower optim.lr" its hint)."""
MAX_SIGMA = 1e30
"""The widest: above ~1e38 1 / (2 sigma) rounds to 0 in float32, and the unbiased estimator's +inf
diagonal times 0 is NaN."""

MEDIAN_SCALES: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
"""With sigmas="median": sigma = scale * (lower median of the pairwise squared distances)."""

MAX_SAMPLES: int = MMDConfig.max_samples
"""Default cap on the rows (source + target, all ranks) one MMD may hold: loss.mmd.max_samples's."""


def mmd(
    fs: torch.Tensor,
    ft: torch.Tensor,
    sigmas: Sequence[float] | str = DEEPMERGE_SIGMAS,
    unbiased: bool = False,
    scope: str = "global",
    clamp: float | None = None,
    max_samples: int = MAX_SAMPLES,
) -> torch.Tensor:
    """Squared MMD between source features `fs` (n, d) and target features `ft` (m, d).

    sigmas: kernel variances (exp(-d^2 / (2 sigma))), default the original's 19; or "median":
        sigma = MEDIAN_SCALES * lower median of all pairwise squared distances of the pooled
        (global) batch, detached, so identical on every rank.
    unbiased: False = V-statistic (means include the diagonal, >= 0, as the original);
        True = U-statistic (diagonals dropped, n(n-1) and m(m-1) normalisers; can be negative).
    scope: "global" = the MMD of the batch gathered from all ranks (exact under DDP, the same
        value on every rank); "local" = this rank's batch only. Without torch.distributed both
        are the local batch.
    clamp: if set, return max(mmd, clamp) like the original (1e-4), which zeroes the gradient
        whenever the estimate is below it; None (default) leaves the estimate alone.
    max_samples: refuse (DmhpcError) a global batch of more rows than this, because memory grows
        as the square of it.

    Computes in float32 at least, outside autocast. Returns a 0-d tensor.
    """
    if fs.ndim != 2 or ft.ndim != 2 or fs.shape[1] != ft.shape[1]:
        raise DmhpcError(
            f"mmd: features must be (n, d) and (m, d) with the same d; got {tuple(fs.shape)} and {tuple(ft.shape)}"
        )
    coeffs = None if isinstance(sigmas, str) and sigmas == "median" else _kernel_coeffs(sigmas)
    with full_precision(fs.device):
        fs, ft = upcast(fs, ft)
        if is_global(scope):
            fs, ft = all_gather_rows(fs, ft)
        n, m = fs.shape[0], ft.shape[0]
        where = "the global batch (all ranks)" if is_global(scope) else "the batch"
        if min(n, m) < min_rows(unbiased):
            raise DmhpcError(
                f"mmd: {where} has {n} source and {m} target rows; the "
                f"{'unbiased' if unbiased else 'biased'} estimator needs at least {min_rows(unbiased)} of each"
            )
        if n + m > max_samples:
            raise DmhpcError(
                f"mmd: {where} has {n + m} rows (source + target) and max_samples is {max_samples}; "
                f"its pairwise kernel matrices would need about {memory_gib(n + m, fs.element_size()):.1f} GiB. "
                "Use scope='local' (per-rank MMD), smaller per-rank batches, or a larger max_samples "
                "(loss.mmd.max_samples) if the memory is there"
            )
        centre = torch.cat([fs, ft]).detach().mean(dim=0)
        ys, yt = fs - centre, ft - centre
        with torch.no_grad():
            dss, dtt, dst = _squared_distances(ys, yt)
            if coeffs is None:
                coeffs = 1.0 / (2.0 * _median_sigmas(dss, dtt, dst))
            else:
                coeffs = device_constants(coeffs, ys.device, ys.dtype)
            if unbiased:
                dss.fill_diagonal_(float("inf"))
                dtt.fill_diagonal_(float("inf"))
        value = _KernelMMD.apply(ys, yt, dss, dtt, dst, coeffs, unbiased)
    if clamp is not None:
        value = value.clamp_min(clamp)
    return value


def _kernel_coeffs(sigmas: Sequence[float] | str) -> tuple[float, ...]:
    """1 / (2 sigma), validated in Python (no tensor-to-bool conversion for torch.compile to trip on)."""
    try:
        values = [float(s) for s in sigmas] if not isinstance(sigmas, str) else []
    except (TypeError, ValueError):
        values = []
    if not values or not all(MIN_SIGMA <= v <= MAX_SIGMA for v in values):
        raise DmhpcError(f"mmd: sigmas must be a non-empty list of numbers from {MIN_SIGMA:g} to {MAX_SIGMA:g}, or "
                         f"'median'; got {sigmas!r}")
    return tuple(1.0 / (2.0 * v) for v in values)


@functools.lru_cache(maxsize=64)
def device_constants(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`values` as a tensor on `device`, made once: a tensor built from host values is a host-to-device
    copy, which waits for the GPU to finish its queued work; once per step it would serialise the
    host and the device. Never written to; a plain tensor even when first asked for under
    inference_mode (an inference tensor cannot be saved for a later backward)."""
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=dtype, device=device)


def _squared_distances(ys: torch.Tensor, yt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three blocks of squared distances, computed in float64 and returned in the rows' dtype.
    In float32 a distance below ~1e-3 of rows whose centred norms are ~1e3 is lost to rounding,
    and those are the pairs the tiny-sigma kernels see: a batch where adaptation made source and
    target rows near twins had its value 32 % low and its gradient 94 % off (docs/losses.md). One
    float64 block at a time (n^2 d flops, small beside the kernels)."""
    exact = torch.float64
    y_s, y_t = ys.to(exact), yt.to(exact)
    blocks = []
    # In place on each Gram block (memory is the limit for a global batch); norms from the Gram
    # diagonals: a + a - 2a is exactly 0 in floating point, so self-distances are exact zeros.
    gss = y_s @ y_s.T
    ns = gss.diagonal().clone()
    blocks.append(gss.mul_(-2).add_(ns[:, None]).add_(ns[None, :]).clamp_min_(0).to(ys.dtype))
    del gss
    gtt = y_t @ y_t.T
    nt = gtt.diagonal().clone()
    blocks.append(gtt.mul_(-2).add_(nt[:, None]).add_(nt[None, :]).clamp_min_(0).to(ys.dtype))
    del gtt
    gst = y_s @ y_t.T
    blocks.append(gst.mul_(-2).add_(ns[:, None]).add_(nt[None, :]).clamp_min_(0).to(ys.dtype))
    return blocks[0], blocks[1], blocks[2]


def _median_sigmas(dss: torch.Tensor, dtt: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """MEDIAN_SCALES times the lower median of the squared distances over distinct pairs."""
    # Indices, not boolean masks: a mask's result has a size the host learns only by waiting for the GPU.
    upper_s = torch.triu_indices(len(dss), len(dss), 1, device=dss.device)
    upper_t = torch.triu_indices(len(dtt), len(dtt), 1, device=dtt.device)
    pairs = torch.cat([dss[upper_s[0], upper_s[1]], dtt[upper_t[0], upper_t[1]], dst.flatten()])
    median = pairs.median()
    # Half the pairs or more at distance 0 (features partly collapsed: rows of dead ReLUs): the
    # mean distance instead, as DeepDA's kernels take. A median of 0 made every kernel an equality
    # test, the loss positive and its gradient exactly 0, when the loss was needed most.
    median = torch.where(median > 0, median, pairs.mean())
    scales = device_constants(MEDIAN_SCALES, dss.device, dss.dtype)
    # All points identical: keep the kernels finite (every one is then 1 on every pair).
    return (median * scales).clamp_min(torch.finfo(dss.dtype).tiny)


def _block_weights(n: int, m: int, unbiased: bool) -> tuple[float, float, float]:
    """Weights of sum(K_ss), sum(K_tt), sum(K_st) in the estimator (K_ts folded into K_st)."""
    if unbiased:
        return 1.0 / (n * (n - 1)), 1.0 / (m * (m - 1)), -2.0 / (n * m)
    return 1.0 / n**2, 1.0 / m**2, -2.0 / (n * m)


_CHUNK = 1 << 22
"""Elements per (pairs x kernels) temporary; larger problems loop over groups of kernels."""


def _kernel_terms(d: torch.Tensor, coeffs: torch.Tensor):
    """Yield (exp(-c_k d_ij) over a group of kernels, as (..., k), and that group's c_k).

    Terms within a factor e of the dtype's smallest normal number, or below it, are flushed to
    zero, as flush-to-zero hardware would: the tiny-sigma kernels put most arguments far below
    log(tiny) (down to -1e9), and the CPU's vectorized exp leaves its fast path for such arguments
    (3-6x slower on DeepMerge's 19 kernels, measured). Clamping first keeps every argument on the
    fast path; what is dropped is below 3.2e-38 per term in float32 (e * tiny, the threshold).
    """
    floor = math.log(torch.finfo(d.dtype).tiny) + 1.0
    flushed = math.exp(floor) * 1.001  # at or below: a clamped term (in place, no mask in memory)
    per = max(1, _CHUNK // max(1, d.numel()))
    for i in range(0, coeffs.numel(), per):
        c = coeffs[i : i + per]
        yield torch.nn.functional.threshold_((d.unsqueeze(-1) * -c).clamp_min_(floor).exp_(), flushed, 0.0), c


def _kernel_sum(d: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """sum_ij sum_k exp(-c_k d_ij), in float64 (see _KernelMMD.forward)."""
    return sum(terms.sum(dtype=torch.float64) for terms, _ in _kernel_terms(d, coeffs))


def _kernel_slope(d: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """d/dd_ij of sum_k exp(-c_k d_ij) = -sum_k c_k exp(-c_k d_ij)."""
    return sum(terms @ -c for terms, c in _kernel_terms(d, coeffs))


class _KernelMMD(torch.autograd.Function):
    """The estimator from precomputed squared distances, with the gradient to the centred rows.

    All kernels of a block are evaluated in one broadcast exp (a few large operations rather
    than one small one per kernel). A block whose kernel values fit in one chunk (`_CHUNK`
    elements: 16 MiB in float32, a batch of a few hundred rows) keeps them for backward; larger
    ones keep only their distances and recompute the kernels there, instead of autograd's saved
    matrix per kernel, so memory does not grow with the number of kernels. The unbiased estimator
    arrives with +inf on the self-block diagonals, whose kernels are then 0.
    """

    @staticmethod
    def forward(ctx, ys, yt, dss, dtt, dst, coeffs, unbiased):
        wss, wtt, wst = _block_weights(ys.shape[0], yt.shape[0], unbiased)
        sums, kept = [], []
        for d in (dss, dtt, dst):
            # Summed in float64: the unbiased value of a few thousand rows (~1e-5) is a difference
            # of sums near 1, which float32 resolved to ~1e-6: the logged value was 1-3% off.
            if d.numel() * coeffs.numel() <= _CHUNK:
                terms, _ = next(_kernel_terms(d, coeffs))  # one group holds every kernel
                sums.append(terms.sum(dtype=torch.float64))
                kept.append(terms)
            else:
                sums.append(_kernel_sum(d, coeffs))
                kept.append(None)
        value = (wss * sums[0] + wtt * sums[1] + wst * sums[2]).to(ys.dtype)
        ctx.save_for_backward(ys, yt, dss, dtt, dst, coeffs, *kept)
        ctx.unbiased = unbiased
        return value

    @staticmethod
    def backward(ctx, grad):
        ys, yt, dss, dtt, dst, coeffs, *kept = ctx.saved_tensors
        wss, wtt, wst = _block_weights(ys.shape[0], yt.shape[0], ctx.unbiased)

        def slope(d, terms):
            return terms @ -coeffs if terms is not None else _kernel_slope(d, coeffs)

        with full_precision(ys.device):
            # d d_ij / d y_i = 2 (y_i - y_j); self blocks count each pair from both ends. Pairs at
            # distance 0 (the diagonal, duplicates) contribute exactly 0, but their slope is huge
            # for the tiny sigmas (sum 1/(2 sigma) ~ 5e5) and would leave rounding noise of that
            # size in sum_j p_ij y_i - sum_j p_ij y_j, so they are dropped.
            pss = slope(dss, kept[0]).mul_(4 * wss).masked_fill_(dss == 0, 0)
            ptt = slope(dtt, kept[1]).mul_(4 * wtt).masked_fill_(dtt == 0, 0)
            pst = slope(dst, kept[2]).mul_(2 * wst).masked_fill_(dst == 0, 0)
            # sum_j p_ij y_i - sum_j p_ij y_j in float64: for near twins p_ij is ~5e5 and the two
            # sums cancel to a few digits, which float32 does not have.
            y_s, y_t = ys.to(torch.float64), yt.to(torch.float64)
            gs = _pull(pss, y_s, y_s) + _pull(pst, y_s, y_t)
            gt = _pull(ptt, y_t, y_t) + _pull(pst.T, y_t, y_s)
        return grad * gs.to(ys.dtype), grad * gt.to(yt.dtype), None, None, None, None, None


def _pull(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_j p_ij (a_i - b_j), in a's dtype (float64 here), one block of p converted at a time."""
    p = p.to(a.dtype)
    return p.sum(1)[:, None] * a - p @ b
