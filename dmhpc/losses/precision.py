"""The precision every loss computes in: float32 at least, with autocast and reduced-precision matmuls off.

The domain-adaptation losses are small differences of large sums (MMD, CORAL) or need log-space
care (entropy, BCE), so they are computed in float32 even when the backbone runs under bf16/fp16
autocast, and float64 inputs stay float64 (the exactness tests run in float64).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def upcast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cast floating tensors to their common dtype, at least float32 (float64 stays float64)."""
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    return tuple(t.to(dtype) for t in tensors)


@contextlib.contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Disable autocast on `device` and use IEEE float32 matmuls (no TF32/bf16 shortcuts).

    TF32 keeps 10 mantissa bits, which is enough to spoil a Gram-matrix distance or a covariance
    difference at the 1e-3 level, so the losses switch it off around their own matmuls and restore
    the caller's setting afterwards.
    """
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(previous)
