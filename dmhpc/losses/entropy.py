"""Entropy minimisation on the classifier's predictions."""

from __future__ import annotations

import torch

from dmhpc.errors import DmhpcError
from dmhpc.losses.collective import per_sample_mean
from dmhpc.losses.precision import full_precision, upcast


def entropy(logits: torch.Tensor, scope: str = "global") -> torch.Tensor:
    """Mean over samples of the prediction entropy -sum_c p_c log p_c, from logits (N, C).

    Uses log-softmax, so it is exact for confident predictions without the original's masking of
    p < 1e-6. scope="global" averages over the samples of all ranks (the same value on every
    rank, exact under DDP even with unequal per-rank batches); "local" over this rank's samples
    (with equal per-rank batches DDP's gradient averaging then gives the same gradients).
    Computes in float32 at least, outside autocast. Returns a 0-d tensor.
    """
    if logits.ndim != 2:
        raise DmhpcError(f"entropy: logits must be (N, classes); got shape {tuple(logits.shape)}")
    with full_precision(logits.device):
        (logits,) = upcast(logits)
        # Infinite logits (an overflow upstream) as their limits: a class of probability 1 (+inf; its
        # log-softmax was inf - inf = NaN) adds 0, and one of probability 0 (-inf) adds 0 log 0 = 0,
        # not 0 * -inf = NaN. A NaN logit stays NaN, for the trainer's finite-loss check.
        big = torch.finfo(logits.dtype).max
        logp = torch.log_softmax(logits.clamp(-big, big), dim=1).clamp_min(-big)
        total = -(logp.exp() * logp).sum()
        return per_sample_mean(total, logits.shape[0], scope)

