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


def _matmul_backends() -> list:
    """The per-backend matmul precision settings of PyTorch's newer API (fp32_precision)."""
    backends = [getattr(torch.backends, "cuda", None), getattr(torch.backends, "mkldnn", None)]
    return [b.matmul for b in backends if b is not None and hasattr(getattr(b, "matmul", None), "fp32_precision")]


@contextlib.contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Disable autocast on `device` and use IEEE float32 matmuls (no TF32/bf16 shortcuts).

    TF32 keeps 10 mantissa bits, which is enough to spoil a Gram-matrix distance or a covariance
    difference at the 1e-3 level, so the losses switch it off around their own matmuls and restore
    the caller's settings afterwards exactly. Through the per-backend
    `torch.backends.{cuda,mkldnn}.matmul.fp32_precision` where PyTorch has it, whichever API the
    caller used: the legacy `torch.set_float32_matmul_precision` cannot be read once the new one
    was written, and restoring through it overwrote every backend's setting with one value (a
    caller's IEEE CUDA matmuls came back as TF32).
    """
    backends = _matmul_backends()
    if backends:  # each backend's own setting saved and restored exactly, whichever API set it
        saved = {b: b.fp32_precision for b in backends}
        for backend in saved:
            backend.fp32_precision = "ieee"

        def restore():
            for backend, value in saved.items():
                backend.fp32_precision = value
    else:  # a PyTorch before the per-backend API
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")

        def restore():
            torch.set_float32_matmul_precision(previous)
    try:
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    finally:
        restore()
