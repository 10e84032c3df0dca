"""The training state: everything a checkpoint holds, saved and loaded as one thing.

`TrainState` bundles the model's parts (the classifier, and the domain discriminator and Fisher
centres when configured), the optimizer, the gradient scaler, the progress (epoch, the step
within it, which is the loader's position, the global step, the best selection score) and every
rank's RNG states. `state_dict()` / `load_state_dict()` are the only places a checkpoint is put
together and taken apart. The dict holds plain data only (see dmhpc/train/checkpoint.py):

    model          the classifier's state_dict (no DDP "module." prefix): what `dmhpc eval` loads
    discriminator, fisher   their state_dicts, when present
    optimizer, scaler       state_dicts
    progress       Progress as a dict
    rng            every rank's RNG states, in rank order
    epoch, step    copies of the progress, for readers that want only these
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch

from dmhpc.data.loaders import KINDS
from dmhpc.models import param_groups
from dmhpc.train.checkpoint import EditedCheckpoint, gather_rng_states, restore_rank_rng_state
from dmhpc.train.objective import DomainAdaptation

# How the steps of a run without a term that reads the target passed its batches, recorded with its
# checkpoints: older ones (no "forward" entry) passed the target batch through BatchNorm too.
FORWARD_SOURCE_ALONE = "source alone"


@dataclass
class Progress:
    """Where the run stands."""

    epoch: int = 0            # current epoch
    step_in_epoch: int = 0    # next step to run within it: the loader's position
    step: int = 0             # global optimizer steps taken
    best_score: float = -math.inf
    evals_since_best: int = 0
    # The longest stretch of evaluations without a better score that a better one ended: a lower
    # train.early_stopping on resume would have stopped the run there (run.check_patience).
    longest_without_best: int = 0
    # What step_in_epoch counts in: the order of an epoch's rows depends on both.
    world_size: int = 0
    loader: str = ""
    # The steps of an epoch in the run's first world: what the schedules count steps in (0: not yet
    # known), so that a world grown at an epoch's end neither rewinds a warm-up nor an inv decay.
    schedule_steps_per_epoch: int = 0
    # Under train.amp=fp16: the steps in a row whose loss was not finite on some rank when the
    # checkpoint was written (EpochMeter.streak; checkpoints of an earlier dmhpc hold each rank's),
    # so a resume stops at the same step an uninterrupted run stops at.
    fp16_streaks: list = field(default_factory=list)


def _check_progress(p: Progress) -> None:
    """An EditedCheckpoint naming the field of a progress that no run writes: its
    numbers index epochs, rows and steps, and a string or a negative one failed as a TypeError, or
    resumed at the wrong place without a word, much later."""
    for key in ("epoch", "step_in_epoch", "step", "evals_since_best", "longest_without_best", "world_size",
                "schedule_steps_per_epoch"):
        value = getattr(p, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise EditedCheckpoint(f"progress.{key} {value!r}: expected a whole number >= 0")
    if not isinstance(p.best_score, (int, float)) or isinstance(p.best_score, bool) or math.isnan(p.best_score):
        raise EditedCheckpoint(f"progress.best_score {p.best_score!r}: expected a number")
    if not isinstance(p.fp16_streaks, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                        for v in p.fp16_streaks):
        raise EditedCheckpoint(f"progress.fp16_streaks {p.fp16_streaks!r}: expected a list of whole numbers >= 0")
    if p.loader not in ("", *KINDS):  # ("": no epoch begun) said here, not as the user's data.loader
        raise EditedCheckpoint(f"progress.loader {p.loader!r}: expected one of {', '.join(KINDS)}")


def _optimizer(o, groups):
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.momentum > 0,
                               weight_decay=o.weight_decay)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


class TrainState:
    """The model (backbone + DA heads), optimizer, grad scaler and progress of one rank."""

    PARTS = ("discriminator", "fisher")  # optional modules of DomainAdaptation, saved when present

    def __init__(self, model: DomainAdaptation, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, progress: Progress | None = None):
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.progress = progress or Progress()

    @classmethod
    def build(cls, cfg, device: torch.device, in_channels: int) -> TrainState:
        """A fresh state as `cfg` says for images of `in_channels` channels: weights seeded by
        cfg.seed, heads at optim.head_lr_mult."""
        model = DomainAdaptation(cfg, seed=cfg.seed, in_channels=in_channels).to(device)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        mult, disc = cfg.optim.head_lr_mult, cfg.optim.discriminator_lr_mult
        groups = param_groups(model.backbone, discriminator=model.discriminator, fisher=model.fisher,
                              head_lr_mult=mult, discriminator_lr_mult=mult if disc is None else disc,
                              fisher_lr_mult=mult)
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")
        return cls(model, _optimizer(cfg.optim, groups), scaler)

    def state_dict(self) -> dict:
        """The checkpoint's content. A collective: every rank calls it (it gathers the RNG states)."""
        state = {
            "model": self.model.backbone.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "progress": asdict(self.progress),
            "rng": gather_rng_states(),
            "epoch": self.progress.epoch,
            "step": self.progress.step,
            "forward": FORWARD_SOURCE_ALONE if not self.model.reads_target else "source and target",
        }
        for part in self.PARTS:
            if getattr(self.model, part) is not None:
                state[part] = getattr(self.model, part).state_dict()
        return state

    def load_state_dict(self, state: dict, rank: int) -> None:
        """Continue from `state`; this rank's RNG states come back when the saved run had this rank."""
        # An entry of another type (an edited checkpoint) failed inside torch as an AttributeError.
        for key in ("model", "optimizer", "scaler", "progress", *(p for p in self.PARTS
                                                                  if getattr(self.model, p) is not None)):
            if not isinstance(state[key], dict):
                raise EditedCheckpoint(f"its {key!r} entry is a {type(state[key]).__name__}, not a dict")
        self.model.backbone.load_state_dict(state["model"])
        for part in self.PARTS:
            if getattr(self.model, part) is not None:
                getattr(self.model, part).load_state_dict(state[part])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        known = {f.name for f in fields(Progress)}  # older checkpoints also kept best_epoch
        self.progress = Progress(**{k: v for k, v in state["progress"].items() if k in known})
        _check_progress(self.progress)
        rng = state["rng"]  # (missing: said as a missing entry)
        try:
            restore_rank_rng_state(rng, rank)
        except (TypeError, AttributeError, KeyError, IndexError, ValueError, RuntimeError) as exc:
            # (a KeyError inside the entry is no missing entry of the checkpoint)
            raise EditedCheckpoint(f"its 'rng' entry is not the random states a run saves "
                                   f"({type(exc).__name__}: {exc})") from None

    def nonfinite_tensors(self) -> list[str]:
        """Names of the model's floating-point parameters and buffers holding NaN or Inf.

        One host synchronisation in all (a stacked check), however many tensors there are.
        """
        named = [(n, t) for n, t in self.model.state_dict().items() if t.is_floating_point()]
        if not named or bool(torch.stack([torch.isfinite(t).all() for _, t in named]).all()):
            return []
        return [n for n, t in named if not bool(torch.isfinite(t).all())]
