"""The DeepMerge CNNs for 75x75 galaxy images: DeepMerge I (with dropout and L2) and DeepMerge II.

Both have three conv blocks (8, 16, 32 channels; 5x5, 3x3, 3x3; 'same' padding; 2x2 max-pool)
and dense layers 2592 -> 64 -> 32 -> num_classes with ReLU, 174,626 parameters for 3 input
channels and 2 classes. forward returns (features, logits) where the features are the 2592
flattened conv outputs (32 x 9 x 9) that the domain-adaptation losses act on.
"""

from __future__ import annotations

import torch
from torch import nn

FEATURE_DIM = 32 * 9 * 9


def _conv_block(cin: int, cout: int, k: int, relu_first: bool, dropout: float) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, kernel_size=k, padding=k // 2)
    norm_act = [nn.ReLU(inplace=True), nn.BatchNorm2d(cout)] if relu_first else [nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    tail = [nn.Dropout(dropout)] if dropout > 0 else []
    return nn.Sequential(conv, *norm_act, nn.MaxPool2d(2), *tail)


def _dense_head(num_classes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(FEATURE_DIM, 64), nn.ReLU(inplace=True), nn.Linear(64, 32), nn.ReLU(inplace=True), nn.Linear(32, num_classes)
    )


class DeepMerge(nn.Module):
    """DeepMerge I (Ciprijanovic et al. 2020) as its paper and notebook describe it.

    Blocks are conv -> ReLU -> BatchNorm -> max-pool -> Dropout(dropout) (the Keras order), then
    the dense head. Unlike the Keras notebook, the hidden dense layers use ReLU (it used softmax)
    and the output is num_classes logits for cross-entropy (it used one sigmoid unit), and
    BatchNorm normalises channels (Keras's default axis normalised the image width). PyTorch's
    defaults stand where Keras's differ: weights initialised Kaiming-uniform (a=sqrt(5)) with
    uniform biases (Keras: Glorot-uniform, zero biases), and BatchNorm's running statistics updated
    with momentum 0.1 and eps 1e-5 (Keras: 0.01 in PyTorch's terms, and 1e-3), which changes the
    statistics evaluation normalises with.

    The L2 weight regularisation of the first two dense layers is the penalty `regularization()`
    = l2 * (||W_1||^2 + ||W_2||^2) (Keras's kernel_regularizer=l2(1e-4)), which the trainer adds
    to the loss; it is independent of the optimiser's own weight decay. The features are the
    flattened conv output before the last dropout; the dense head sees the dropped-out copy.
    """

    feature_dim = FEATURE_DIM

    def __init__(self, in_channels: int = 3, num_classes: int = 2, dropout: float = 0.5, l2: float = 1e-4) -> None:
        super().__init__()
        self.l2 = float(l2)
        self.conv = nn.Sequential(
            _conv_block(in_channels, 8, 5, True, dropout),
            _conv_block(8, 16, 3, True, dropout),
            _conv_block(16, 32, 3, True, 0.0),
        )
        self.dropout = nn.Dropout(dropout)
        self.classifier = _dense_head(num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.conv(x).flatten(1)
        return features, self.classifier(self.dropout(features))

    def regularization(self) -> torch.Tensor:
        """The L2 penalty on the first two dense layers' weights (not biases), to add to the loss."""
        return self.l2 * (self.classifier[0].weight.square().sum() + self.classifier[2].weight.square().sum())

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters that get the head learning-rate multiplier: none (trained from scratch, lr x1)."""
        return []

    def last_conv_block(self) -> nn.Module:
        """The last convolutional block, whose output Grad-CAM weighs (dmhpc explain)."""
        return self.conv[-1]


class DeepMerge2(nn.Module):
    """The PyTorch DeepMerge of DeepMerge II (Ciprijanovic et al. 2021), section B.1.

    Blocks are conv -> BatchNorm -> ReLU -> max-pool, no dropout, no L2 beyond the optimiser's
    weight decay, PyTorch default initialisation.
    """

    feature_dim = FEATURE_DIM

    def __init__(self, in_channels: int = 3, num_classes: int = 2) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv_block(in_channels, 8, 5, False, 0.0),
            _conv_block(8, 16, 3, False, 0.0),
            _conv_block(16, 32, 3, False, 0.0),
        )
        self.classifier = _dense_head(num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.conv(x).flatten(1)
        return features, self.classifier(features)

    def regularization(self) -> torch.Tensor:
        """No model-specific penalty: a zero to add to the loss."""
        return self.classifier[0].weight.new_zeros(())

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters that get the head learning-rate multiplier: none (the original used lr x1)."""
        return []

    def last_conv_block(self) -> nn.Module:
        """The last convolutional block, whose output Grad-CAM weighs (dmhpc explain)."""
        return self.conv[-1]
