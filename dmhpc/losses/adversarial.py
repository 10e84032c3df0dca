"""DANN: gradient reversal, its coefficient schedule, and the domain-classification loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dmhpc.config import GRLConfig
from dmhpc.errors import DmhpcError
from dmhpc.losses.collective import per_sample_mean
from dmhpc.losses.precision import full_precision, upcast
from dmhpc.names import GRL_SCHEDULES


def grl_coefficient(step: int, total_steps: int, grl: GRLConfig) -> float:
    """The gradient-reversal coefficient lambda at global optimiser step `step` of `total_steps`.

    schedule "dann": lambda = high * (2 / (1 + exp(-alpha p)) - 1) with p = step / total_steps
    (Ganin et al.; 0 at the start, high * 0.9999 at p = 1 for alpha = 10). schedule "constant":
    lambda = high (the original DeepMerge code: 1 throughout). A pure function of the global
    step, so every rank and a resumed run get the same value. It takes the configuration section
    itself, so no default here can differ from the config's.
    """
    if grl.schedule not in GRL_SCHEDULES:
        raise DmhpcError(f"grl schedule: {grl.schedule!r} is not one of {', '.join(GRL_SCHEDULES)}")
    if grl.schedule == "constant":
        return float(grl.high)
    if total_steps <= 0 or step < 0:
        raise DmhpcError(f"grl schedule: needs step >= 0 and total_steps > 0; got step={step}, total_steps={total_steps}")
    p = step / total_steps
    return float(grl.high) * (2.0 / (1.0 + math.exp(-grl.alpha * p)) - 1.0)


class _ReverseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, coeff: float) -> torch.Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * -ctx.coeff, None


def grad_reverse(x: torch.Tensor, coeff: float) -> torch.Tensor:
    """Identity forward; backward multiplies the gradient by -coeff."""
    return _ReverseGrad.apply(x, float(coeff))


class GradientReversal(nn.Module):
    """Module form of `grad_reverse`: `GradientReversal()(x, coeff)`, coeff from `grl_coefficient`."""

    def forward(self, x: torch.Tensor, coeff: float) -> torch.Tensor:
        return grad_reverse(x, coeff)


def dann_loss(domain_logits_s: torch.Tensor, domain_logits_t: torch.Tensor, scope: str = "global") -> torch.Tensor:
    """Binary cross-entropy of the domain discriminator: source = 1, target = 0.

    Takes logits ((N,) or (N, 1)), not probabilities: BCE-with-logits is stable where a sigmoid
    saturates. The mean runs over source and target samples together (as the original's BCE over
    the concatenated batch); scope="global" over all ranks' samples (same value on every rank,
    exact under DDP), "local" over this rank's. Computes in float32 at least, outside autocast.
    """
    for name, z in (("source", domain_logits_s), ("target", domain_logits_t)):
        if not (z.ndim == 1 or (z.ndim == 2 and z.shape[1] == 1)):
            raise DmhpcError(f"dann_loss: {name} domain logits must be (N,) or (N, 1); got {tuple(z.shape)}")
    with full_precision(domain_logits_s.device):
        zs, zt = upcast(domain_logits_s.reshape(-1), domain_logits_t.reshape(-1))
        total = F.binary_cross_entropy_with_logits(zs, torch.ones_like(zs), reduction="sum")
        total = total + F.binary_cross_entropy_with_logits(zt, torch.zeros_like(zt), reduction="sum")
        return per_sample_mean(total, zs.shape[0] + zt.shape[0], scope)
