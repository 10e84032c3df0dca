"""One training step, the one the trainer and every benchmark call.

    step = TrainStep(cfg, state, dist, total_steps=..., steps_per_epoch=...)
    terms, outputs = step(state.progress.step, (xs, ys, xt, yt))

A step sets each parameter group's learning rate and the gradient-reversal coefficient from the
global step (pure functions of it, so every rank and a resumed run agree), runs the objective on
the source and target batch under autocast, and takes one optimizer step through the gradient
scaler (a no-op unless train.amp is fp16), clipping the gradient norm if asked. It returns the
loss terms and outputs detached and on the device: nothing here waits for the device, but the fp16
scaler, which reads back every step whether the gradients were finite (docs/training.md).
"""

from __future__ import annotations

import contextlib
import inspect
import os

import torch

from dmhpc.losses import grl_coefficient
from dmhpc.train.schedule import lr_factor


@contextlib.contextmanager
def determinism(on: bool):
    """Deterministic kernels, as train.deterministic asks, for the block (enter it before the first
    cuBLAS call); the process's own settings come back after it."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if on:
        # cuBLAS needs a fixed workspace to be deterministic; it reads this when its handle is made.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    _deterministic_algorithms(on, False)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        _deterministic_algorithms(*before[:2])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2:]
        if workspace is None:  # (cuBLAS handles made meanwhile keep the workspace they were made with)
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def _deterministic_algorithms(on: bool, warn_only: bool) -> None:
    """torch.use_deterministic_algorithms, called only to change the setting: the call imports the
    compiler (about 2 s on a CPU; a run refused before its optimizer is built needs none)."""
    if (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) \
            != (on, warn_only):
        torch.use_deterministic_algorithms(on, warn_only=warn_only)


def autocast(amp: str, device: torch.device):
    """The autocast context of train.amp ("none", "bf16" or "fp16")."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _wrapped(model: torch.nn.Module, cfg, dist) -> tuple[torch.nn.Module, bool]:
    """The model as the step calls it (in DDP across ranks, compiled with train.compile), and
    whether its calls must run with dynamo's DDP optimizer off.

    One gradient bucket per parameter where a resumed run is promised the bits of one never
    stopped (on a CPU; on a GPU with train.deterministic): the ring all-reduce of 3 or more ranks
    sums an element in an order set by its place in its bucket, and DDP starts with every gradient
    in one bucket and lays them out anew after its first step, so the first step after a resume
    summed in another order than the uninterrupted run's (weights 1e-9 to 1e-7 apart at 3 ranks;
    2 ranks' sums commute). A parameter's own bucket keeps every element's place: a per-bucket cap
    of 0, for the first layout and the rebuilt one alike (a plain bucket_cap_mb leaves the first
    whole). An all-reduce per parameter: nothing beside a CPU step. Compiled, dynamo's DDP
    optimizer would split the graph at those buckets, and refuses buckets of 0 bytes: it is off
    for those calls (one graph; its overlap of the all-reduces with the backward matters on a
    GPU, where only train.deterministic asks for these buckets). A torch older than the pinned one,
    without per-bucket caps, keeps DDP's default buckets, and the bits beyond 2 ranks go.
    """
    objective = model
    if dist.world_size > 1:
        ddp = torch.nn.parallel.DistributedDataParallel
        device_ids = [dist.device.index] if dist.device.type == "cuda" else None
        exact = (dist.device.type != "cuda" or cfg.train.deterministic) and \
            "bucket_cap_mb_list" in inspect.signature(ddp).parameters
        model = ddp(model, device_ids=device_ids, bucket_cap_mb_list=[0]) if exact else ddp(model, device_ids=device_ids)
    else:
        exact = False
    if not cfg.train.compile:
        return model, False
    objective.keep_losses_eager()
    return torch.compile(model), exact


class TrainStep:
    """The configured optimizer step over one (xs, ys, xt, yt) batch; see the module docstring."""

    def __init__(self, cfg, state, dist, *, total_steps: int, steps_per_epoch: int,
                 schedule_steps_per_epoch: int | None = None):
        self.cfg, self.state = cfg, state
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.schedule_steps_per_epoch = schedule_steps_per_epoch or steps_per_epoch
        self.forward, self._whole_graph = _wrapped(state.model, cfg, dist)
        self.autocast = autocast(cfg.train.amp, dist.device)
        self._lr = None  # the scale last applied: groups are updated only when it changes
        # Under fp16 a step the scaler skips has already updated the running statistics in its
        # forward pass (BatchNorm's, the Fisher centres): an overflow made them NaN or Inf, and the
        # next check of the weights stopped the run the scaler had kept going.
        self._guarded = [b for b in state.model.buffers() if b.is_floating_point()] if cfg.train.amp == "fp16" else []

    def lr_scale(self, step: int) -> float:
        """The rate's factor at `step` of this world, counted in the steps of the run's first world
        (`schedule_steps_per_epoch`): the same point of an epoch gets the same rate in any world."""
        first, now = self.schedule_steps_per_epoch, self.steps_per_epoch
        if first == now:
            return lr_factor(step, self.cfg.optim, total_steps=self.total_steps, steps_per_epoch=now)
        # The run's last step, (total_steps - 1) * first / now, is the schedule's last: scaled as
        # total_steps * first / now, warmup-cosine's end came after it, and min_lr was never reached.
        return lr_factor(step * first / now, self.cfg.optim, total_steps=(self.total_steps - 1) * first / now + 1,
                         steps_per_epoch=first)

    def grl(self, step: int) -> float:
        return grl_coefficient(step, self.total_steps, self.cfg.loss.grl)

    def __call__(self, step: int, batch) -> tuple[dict, dict]:
        """Optimizer step number `step` (0-based, global) on `batch`; returns (terms, outputs)."""
        xs, ys, xt, _ = batch
        state, cfg = self.state, self.cfg
        scale = self.lr_scale(step)
        if scale != self._lr:
            for group in state.optimizer.param_groups:
                group["lr"] = cfg.optim.lr * group["lr_mult"] * scale
            self._lr = scale
        if cfg.train.channels_last:
            xs = xs.contiguous(memory_format=torch.channels_last)
            xt = xt.contiguous(memory_format=torch.channels_last) if xt is not None else None
        whole = torch._dynamo.config.patch(optimize_ddp=False) if self._whole_graph else contextlib.nullcontext()
        before = [b.clone() for b in self._guarded]
        with self.autocast, whole:
            loss, terms, outputs = self.forward(xs, ys, xt, self.grl(step))
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(loss).backward()
        if cfg.optim.grad_clip:
            state.scaler.unscale_(state.optimizer)
            torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.optim.grad_clip)
        state.scaler.step(state.optimizer)
        state.scaler.update()
        # After the backward, which holds the buffers' versions: each value that overflowed keeps
        # its last one (on the device: no host wait).
        for buffer, old in zip(self._guarded, before):
            buffer.copy_(torch.where(torch.isfinite(buffer), buffer, old))
        return terms, outputs
