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
    - warmup-cosine: linear warmup over `warmup_steps` (1 at its last step), then cosine decay to
      `min_lr` at the run's last step.
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
        # From the peak (the warmup's last step, or step 0) to the run's last step, total_steps - 1:
        # measured from warmup_steps to total_steps, the peak was held two steps and min_lr came
        # at a step never trained.
        peak = max(warmup_steps - 1, 0)
        span = max(1.0, total_steps - 1 - peak)
        progress = min(1.0, (step - peak) / span)
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

