"""Optimiser parameter groups with learning-rate multipliers (the original's lr_mult)."""

from __future__ import annotations

from torch import nn


def param_groups(
    model: nn.Module,
    discriminator: nn.Module | None = None,
    fisher: nn.Module | None = None,
    *,
    head_lr_mult: float,
    discriminator_lr_mult: float,
    fisher_lr_mult: float,
) -> list[dict]:
    """Parameter groups for torch.optim: [{"name", "params", "lr_mult"}, ...].

    "trunk" (lr_mult 1): the model's parameters outside `model.head_parameters()`;
    "head": the ResNet bottleneck and classifier (DeepMerge models have none: the original
            trained them with one lr); "discriminator": the domain discriminator;
    "fisher": the Fisher loss's class centres. The original used x10 for all three.
    Pass the unwrapped modules (not the DDP wrappers). Groups without trainable parameters are
    left out. A scheduler sets each group's lr to base_lr * lr_mult.
    """
    head_ids = {id(p) for p in model.head_parameters()}
    groups = [
        ("trunk", [p for p in model.parameters() if id(p) not in head_ids], 1.0),
        ("head", list(model.head_parameters()), head_lr_mult),
        ("discriminator", list(discriminator.parameters()) if discriminator is not None else [], discriminator_lr_mult),
        ("fisher", list(fisher.parameters()) if fisher is not None else [], fisher_lr_mult),
    ]
    return [
        {"name": name, "params": trainable, "lr_mult": float(mult)}
        for name, params, mult in groups
        if (trainable := [p for p in params if p.requires_grad])
    ]
