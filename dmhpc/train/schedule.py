"""Learning-rate schedules as pure functions of the global step.

A function of the step (not a stateful scheduler) gives the same rate on every rank and after a
resume without saving anything. Each parameter group's rate is `base_lr * lr_mult * factor(step)`.
"""

from __future__ import annotations

import math


def lr_factor(step: float, optim, *, total_steps: float, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rate at `step` (0-based; a fraction where the steps are another
    world's, see TrainStep.lr_scale), as the `optim` section says.

    - constant: 1.
    - warmup-cosine: linear warmup over `warmup_steps`, then cosine decay to `min_lr`.
    - cyclic: the original DeepMerge "one-cycle", which is in fact a repeating triangle between
      lr/10 and lr with a period of 0.9 * cycle_epochs epochs (kept, minus its broken branches).
    - inv: (1 + gamma * step) ** -power, the original's default, here applied every step.

    It takes the configuration section itself, so no default here can differ from the config's.
    """
    schedule, lr = optim.schedule, optim.lr
    warmup_steps, min_lr, cycle_epochs = optim.warmup_steps, optim.min_lr, optim.cycle_epochs
    gamma, power = optim.gamma, optim.power
    if schedule == "constant":
        return 1.0
    if schedule == "warmup-cosine":
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        floor = min_lr / lr if lr > 0 else 0.0
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "cyclic":
        # (a period longer than any run rises throughout; int() of a float beyond it overflowed)
        period = max(2, int(min(0.9 * cycle_epochs * steps_per_epoch, 2.0 ** 62)))
        half = period / 2.0
        phase = step % period
        rise = phase / half if phase < half else (period - phase) / half
        return 0.1 + 0.9 * rise
    if schedule == "inv":
        return (1.0 + gamma * step) ** (-power)
    raise ValueError(f"unknown schedule {schedule!r}")

