"""Learning-rate schedules (dmhpc/train/schedule.py) against hand-computed values."""

from __future__ import annotations

import pytest

from dmhpc.train.schedule import lr_factor


def _f(step, schedule, **kw):
    from dmhpc.config import OptimConfig

    optim = OptimConfig(schedule=schedule, lr=1e-3, **{k: float(v) if isinstance(v, int) and k != "warmup_steps" else v
                                                     for k, v in kw.items()})
    return lr_factor(step, optim, total_steps=100, steps_per_epoch=10)


def test_warmup_cosine():
    """Steps 0 to 99: the peak at the warmup's last step (9), min_lr at the last step (99). The cosine
    ran from step 10 to step 100: the peak was held two steps and min_lr came at a step never trained."""
    assert _f(0, "warmup-cosine", warmup_steps=10) == pytest.approx(0.1)
    assert _f(9, "warmup-cosine", warmup_steps=10) == pytest.approx(1.0)
    assert _f(10, "warmup-cosine", warmup_steps=10) < 1.0
    assert _f(54, "warmup-cosine", warmup_steps=10) == pytest.approx(0.5)
    assert _f(99, "warmup-cosine", warmup_steps=10, min_lr=1e-4) == pytest.approx(0.1)
    assert _f(0, "warmup-cosine", min_lr=1e-4) == pytest.approx(1.0)  # without warmup: the peak first
    assert _f(99, "warmup-cosine", min_lr=1e-4) == pytest.approx(0.1)


def test_cyclic_is_the_originals_triangle_between_lr_over_10_and_lr():
    # period 0.9 * cycle_epochs * steps_per_epoch = 18 steps
    values = [_f(s, "cyclic", cycle_epochs=2) for s in range(37)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0) and values[18] == pytest.approx(0.1)
    assert values[:18] == pytest.approx(values[18:36])
    assert min(values) >= 0.1 - 1e-12 and max(values) <= 1.0 + 1e-12


def test_a_cycle_longer_than_any_run_rises_throughout():
    """optim.cycle_epochs 1e308 was an OverflowError traceback at the first step, its run directory
    begun."""
    values = [_f(s, "cyclic", cycle_epochs=1e308) for s in range(0, 100, 10)]
    assert values == sorted(values) and values[0] == pytest.approx(0.1) and values[-1] < 0.1 + 1e-12


def test_inv_and_constant():
    assert _f(0, "inv") == 1.0
    assert _f(1000, "inv", gamma=0.001, power=0.75) == pytest.approx(2 ** -0.75)
    assert _f(77, "constant") == 1.0


def test_every_step_of_each_shape():
    """The values above are points where other shapes meet (a linear decay equals the cosine at its
    midpoint, step 54): the whole curves, step by step, against their formulas."""
    import math

    for s in range(100):  # warmup over steps 0-9 reaching 1 at step 9, then a cosine to min_lr at step 99
        warm = (s + 1) / 10 if s < 10 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 9) / 90))
        assert _f(s, "warmup-cosine", warmup_steps=10, min_lr=1e-4) == pytest.approx(warm, abs=1e-12), s
        phase = s % 18  # a triangle of 18 steps: up from 0.1 over 9, down over 9
        tri = 0.1 + 0.9 * (phase / 9 if phase < 9 else (18 - phase) / 9)
        assert _f(s, "cyclic", cycle_epochs=2) == pytest.approx(tri, abs=1e-12), s
        assert _f(s, "inv", gamma=0.01, power=0.75) == pytest.approx((1 + 0.01 * s) ** -0.75, abs=1e-12), s


def test_a_cycle_of_a_fractional_number_of_steps_is_cut_to_whole_steps():
    """0.9 * cycle_epochs epochs is rarely a whole number of steps (31.5 at 7 steps an epoch and 5
    epochs): the period is its whole part, as the original's int(); the tests' 18-step period was
    whole, and a period rounded up (32) passed them."""
    from dmhpc.config import OptimConfig

    optim = OptimConfig(schedule="cyclic", lr=1e-3, cycle_epochs=5.0)
    values = [lr_factor(s, optim, total_steps=100, steps_per_epoch=7) for s in range(63)]
    assert values[31] == pytest.approx(0.1) and values[62] == pytest.approx(0.1)  # a new cycle every 31 steps
    assert values[15] == pytest.approx(0.1 + 0.9 * 15 / 15.5)  # (rising for 15.5 steps)
    assert values[:31] == pytest.approx(values[31:62])
