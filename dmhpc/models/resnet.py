"""ResNet-18/34/50/101/152 for 75x75 images, with DeepMerge II's bottleneck-and-classifier head.

The trunk is torchvision's ResNet v1.5 layout (stride on the 3x3 conv of a bottleneck block),
written here because torchvision is not a dependency. Two stems:
  "original": 7x7 stride-2 conv + 3x3 stride-2 max-pool (ImageNet's, as DeepMerge II used):
              75 -> 38 -> 19 -> ... -> a 3x3 map before pooling;
  "small":    3x3 stride-1 conv, no max-pool (CIFAR-style): 75 -> 75 -> ... -> a 10x10 map;
              the blocks then run on (75/19)^2 ~ 16x more positions than with "original".
Head (section B.2): a linear bottleneck 512*expansion -> bottleneck_dim, weights N(0, 0.005),
bias 0, whose output is the features; a classifier bottleneck_dim -> num_classes, N(0, 0.01).
"""

from __future__ import annotations

import torch
from torch import nn

from dmhpc.errors import DmhpcError

STEMS = ("original", "small")


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.downsample(x))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


def _stem(in_channels: int, stem: str) -> nn.Sequential:
    if stem == "original":
        return nn.Sequential(
            nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
    if stem == "small":
        return nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
    raise DmhpcError(f"resnet stem: {stem!r} is not one of {', '.join(STEMS)}")


class GlobalAveragePool(nn.Module):
    """The mean over each feature map: AdaptiveAvgPool2d(1), whose backward on CUDA has no
    deterministic implementation (train.deterministic would refuse it), without that problem."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=True)


class ResNet(nn.Module):
    """ResNet trunk + bottleneck + classifier; forward returns (bottleneck features, logits)."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        stem: str = "original",
        in_channels: int = 3,
        num_classes: int = 2,
        bottleneck_dim: int = 256,
    ) -> None:
        super().__init__()
        self.feature_dim = bottleneck_dim
        stages: list[nn.Module] = [_stem(in_channels, stem)]
        cin = 64
        for i, (width, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            for j in range(blocks):
                stages.append(block(cin, width, stride if j == 0 else 1))
                cin = width * block.expansion
        stages += [GlobalAveragePool(), nn.Flatten(1)]
        self.trunk = nn.Sequential(*stages)
        self.bottleneck = nn.Linear(cin, bottleneck_dim)
        self.classifier = nn.Linear(bottleneck_dim, num_classes)
        for mod in self.trunk.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(mod, nn.BatchNorm2d):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)
        nn.init.normal_(self.bottleneck.weight, 0.0, 0.005)
        nn.init.zeros_(self.bottleneck.bias)
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.bottleneck(self.trunk(x))
        return features, self.classifier(features)

    def regularization(self) -> torch.Tensor:
        """No model-specific penalty: a zero to add to the loss."""
        return self.classifier.weight.new_zeros(())

    def head_parameters(self) -> list[nn.Parameter]:
        """The bottleneck and classifier, which get the head learning-rate multiplier (x10 originally)."""
        return [*self.bottleneck.parameters(), *self.classifier.parameters()]

    def last_conv_block(self) -> nn.Module:
        """The last residual block (before the average pooling), whose output Grad-CAM weighs."""
        return self.trunk[-3]


LAYOUTS: dict[str, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}


def resnet(depth_name: str, stem: str = "original", in_channels: int = 3, num_classes: int = 2, bottleneck_dim: int = 256) -> ResNet:
    """Build one of LAYOUTS ("resnet18" ... "resnet152")."""
    block, layers = LAYOUTS[depth_name]
    return ResNet(block, layers, stem=stem, in_channels=in_channels, num_classes=num_classes, bottleneck_dim=bottleneck_dim)
