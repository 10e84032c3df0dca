"""One epoch's bookkeeping on the device, and the guard against a diverged run (non-finite loss or weights)."""

from __future__ import annotations

import math

import numpy as np
import torch

from dmhpc.distributed import all_gather_object, all_reduce_mean, all_reduce_min, gather_to_main, on_main
from dmhpc.errors import DmhpcError
from dmhpc.train.metrics import domain_metrics


class Diverged(DmhpcError):
    """The run's loss, weights or selection score went non-finite: stopped without writing them.
    `agreed`: every rank raised it (found by a collective), so they can meet to log it; else this
    rank alone did, while the others wait in the step's gradient exchange."""

    def __init__(self, message: str, agreed: bool = True):
        super().__init__(message)
        self.agreed = agreed

_NONE = 2**62  # "no non-finite value yet": above any step, so a MIN over ranks finds the first
# Under fp16 a forward pass can overflow now and then (the gradient scaler then skips that step's
# update): a non-finite loss is not an error at once. This many in a row is a loss that stays NaN or
# Inf, a run that updates nothing more and "finishes" untrained.
FP16_SKIPPED_IN_A_ROW = 16


class EpochMeter:
    """One epoch's bookkeeping, kept on the device: loss sums, predictions, discriminator outputs,
    and the first step at which each loss term was not finite.

    `add` queues device work only; `check_finite` and `summary` are collectives that every rank
    calls at the same step, and the only places that wait for the device.
    """

    def __init__(self, device, watch_loss: bool = True, streak: int | None = None):
        self.device, self.watch_loss = device, watch_loss
        self.names: list[str] = []
        self.sums = None
        self.first_bad = None  # per term: the first step (as counted after it) with a non-finite value
        # Where non-finite losses are expected (fp16): the current streak of steps whose loss was not
        # finite on some rank, as of the last `check_finite` (carried over from the previous epoch's
        # meter: short epochs would never see a long one), and the first step that ended a streak of
        # FP16_SKIPPED_IN_A_ROW. Counted per rank, ranks overflowing in turn skipped every step (the
        # scaler skips a step that overflowed anywhere) and no rank's streak ever grew.
        self.streak = streak or 0
        self.first_stuck: int | None = None
        self.steps = 0
        # fp16: each step's terms and whether they were finite here, kept until `summary` agrees with
        # the other ranks which steps the scaler skipped (see there); the flags of steps before
        # `_checked` are in `streak`.
        self.vectors: list[torch.Tensor] = []
        self.flags: list[torch.Tensor] = []
        self.flag_steps: list[int] = []
        self._checked = 0
        self.preds: dict[str, list] = {"source": [], "target": []}
        self.domain_logits: list = []

    def add(self, step: int, terms: dict, outputs: dict, ys, yt) -> None:
        """Record optimizer step number `step` (counted after it: 1 for the first)."""
        if not self.names:
            self.names = sorted(terms)
            self.first_bad = torch.full((len(self.names),), _NONE, dtype=torch.int64, device=self.device)
        # float64: an epoch of 1e5-1e6 steps summed in float32 is off by 1e-6-1e-5 of its mean.
        vec = torch.stack([terms[k].double() for k in self.names])
        if self.watch_loss:  # a non-finite loss stops the run at check_finite, and is kept
            self.sums = (self.sums if self.sums is not None else torch.zeros_like(vec)) + vec
            bad = ~torch.isfinite(vec) & (self.first_bad == _NONE)
            self.first_bad = torch.where(bad, step, self.first_bad)
        else:
            self.vectors.append(vec)
            self.flags.append(torch.isfinite(vec).all())
            self.flag_steps.append(step)
        self.steps += 1
        # float64, as the evaluation's: float32 rounds p to exactly 1 past a logit margin of ~17, where
        # confident predictions tie and the train ROC AUC lost their order (0.5 for a perfect ranking).
        prob = torch.softmax(outputs["logits"].double(), dim=1)
        self.preds["source"].append((ys, prob[: len(ys)]))
        if prob.shape[0] > len(ys):  # (a run without adaptation passes no target rows: none to record)
            self.preds["target"].append((yt, prob[len(ys):]))
        if "domain_logits" in outputs:
            self.domain_logits.append(outputs["domain_logits"])

    def check_finite(self, state, dist, step: int) -> None:
        """Raise DmhpcError on every rank if a loss term or a weight of any rank is not finite.

        Called before every checkpoint and every logged step, so a non-finite state is never
        written and a diverged run stops within train.log_every steps of the first bad one.
        """
        weights = state.nonfinite_tensors()
        first = self.first_bad.cpu() if self.first_bad is not None else torch.zeros(0, dtype=torch.int64)
        new = self.flags[self._checked:]
        flags = torch.stack(new).to(torch.int64).cpu() if new else torch.zeros(0, dtype=torch.int64)
        agreed = all_reduce_min(torch.cat([first, flags, torch.tensor([-1 if weights else 0])])).tolist()
        bad_steps, finite, weights_bad = agreed[:len(first)], agreed[len(first):-1], agreed[-1] < 0
        for at, ok in zip(self.flag_steps[self._checked:], finite):  # (the same steps on every rank)
            self.streak = 0 if ok else self.streak + 1
            if self.streak >= FP16_SKIPPED_IN_A_ROW and self.first_stuck is None:
                self.first_stuck = at
        self._checked = len(self.flags)
        hint = "lower optim.lr or set optim.grad_clip; the last good checkpoint is kept"
        if self.first_stuck is not None:
            stuck = self.first_stuck
            raise Diverged(f"step {stuck}: the loss was not finite (NaN or Inf) for {FP16_SKIPPED_IN_A_ROW} steps "
                             f"in a row under train.amp=fp16; training stopped "
                             f"at step {step} without writing it ({hint}, or train.amp=bf16)")
        if any(s != _NONE for s in bad_steps):
            at = min(s for s in bad_steps if s != _NONE)
            names = [n for n, s in zip(self.names, bad_steps) if s == at]
            raise Diverged(f"step {at}: loss term{'s' if len(names) > 1 else ''} {', '.join(names)} not "
                             f"finite (NaN or Inf); training stopped at step {step} without writing it ({hint})")
        if weights_bad:
            what = f"{len(weights)} tensors, e.g. {weights[0]}" if weights else "on another rank"
            raise Diverged(f"step {step}: non-finite weights ({what}); training stopped without writing "
                             f"them ({hint})")

    def _kept_steps(self) -> list[bool]:
        """Which steps count: all, but under fp16 those whose loss was not finite on some rank. The
        scaler skips such a step on every rank (the gradients are averaged): counted per rank, a step
        that overflowed on one rank entered the others' means and train metrics as a trained one,
        which a single NaN made NaN on its own rank. (One collective, at the epoch's end.)"""
        if self.watch_loss or not self.flags:
            return [True] * self.steps
        return (all_reduce_min(torch.stack(self.flags).to(torch.int64)) > 0).tolist()

    def summary(self, dist) -> dict:
        """Loss means over steps and ranks, train metrics per domain, discriminator accuracy."""
        record: dict = {"loss": {}}
        kept = self._kept_steps()
        if self.names:
            if self.watch_loss:
                sums = self.sums
            else:
                vectors = torch.stack(self.vectors)
                mask = torch.tensor(kept, device=vectors.device)
                sums = torch.where(mask[:, None], vectors, 0.0).sum(0)
            both = all_reduce_mean(sums)  # (every rank counted the same steps)
            counted = sum(kept)
            record["loss"] = dict(zip(self.names, (both / counted if counted else both * math.nan).tolist()))
            if not self.watch_loss:  # fp16: steps whose loss was not finite on some rank, left out above.
                # The scaler skips those, and also steps whose gradients alone overflowed, which are
                # not counted here (their loss is a loss like another's).
                record["nonfinite_loss_steps"] = self.steps - counted
        for domain, pairs_of_steps in self.preds.items():
            pairs = [pair for pair, keep in zip(pairs_of_steps, kept) if keep]
            labels = torch.cat([y for y, _ in pairs]).cpu().numpy() if pairs else np.zeros(0, np.int64)
            prob = torch.cat([p for _, p in pairs]).cpu().numpy() if pairs else np.zeros((0, 2), np.float64)
            # Every rank's predictions to rank 0, whose metrics every rank gets: gathered onto every
            # rank, each received all of them (1.7 GB a domain at 7e7 rows) and computed the same
            # scikit-learn metrics on them, every epoch.
            parts = gather_to_main((labels, prob))

            def metrics(parts=parts) -> dict:
                labels = np.concatenate([p[0] for p in parts])
                prob = np.concatenate([p[1] for p in parts])
                # Empty when a resume lands on the end of an epoch: nothing left to train in it.
                return {"train": domain_metrics(labels, prob)} if len(labels) else {}

            record[domain] = on_main(metrics)
        if self.domain_logits:
            correct = total = 0
            for d, keep in zip(self.domain_logits, kept):  # source first in each batch
                if not keep:
                    continue
                half = d.shape[0] // 2
                correct += int((d[:half] > 0).sum()) + int((d[half:] <= 0).sum())
                total += d.shape[0]
            parts = all_gather_object((correct, total))
            counted = sum(p[1] for p in parts)
            # No step counted (each one's loss not finite): no accuracy, as the loss means are NaN.
            record["discriminator_accuracy"] = sum(p[0] for p in parts) / counted if counted else math.nan
        return record
