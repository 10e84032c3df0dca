"""Heads that sit on the features: the DANN domain discriminator behind a gradient reversal."""

from __future__ import annotations

import torch
from torch import nn

from dmhpc.losses.adversarial import grad_reverse


class DomainDiscriminator(nn.Module):
    """features -> hidden -> hidden -> 1 domain logit, ReLU and dropout between (section B.3).

    forward(features, coeff) first reverses the gradient with coefficient `coeff` (from
    `dmhpc.losses.grl_coefficient(step, total_steps, cfg.loss.grl)`, a function of the global step), then
    returns logits of shape (N,): pass them to `dmhpc.losses.dann_loss`, which applies the
    sigmoid inside a numerically safe BCE. Initialisation as FisherDA: hidden weights N(0, 0.01),
    output N(0, 0.3), biases 0.
    """

    def __init__(self, in_features: int, hidden: int = 1024, dropout: float = 0.5) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, 1),
        )
        for layer, std in zip((self.net[0], self.net[3], self.net[6]), (0.01, 0.01, 0.3)):
            nn.init.normal_(layer.weight, 0.0, std)
            nn.init.zeros_(layer.bias)

    def forward(self, features: torch.Tensor, coeff: float) -> torch.Tensor:
        return self.net(grad_reverse(features, coeff)).squeeze(1)
