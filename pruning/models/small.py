"""The embedded default networks: a small Inception-style net and an independent observer net.

``InceptionSmall`` mirrors GoogLeNet's structure and module names (``conv1..conv3`` stem,
``inception3a..`` blocks of four concatenated branches, ``fc``) at a size that trains on a
laptop CPU, so the same layer names, exclusion rules and ``torch.cat`` handling apply to both.
"""
from __future__ import annotations

import torch
from torch import nn


class BasicConv2d(nn.Module):
    """conv (no bias) → BatchNorm → ReLU, as in torchvision's GoogLeNet."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class Inception(nn.Module):
    """Four branches (1x1; 1x1→3x3; 1x1→3x3; pool→1x1) concatenated along channels."""

    def __init__(self, in_channels: int, ch1x1: int, ch3x3red: int, ch3x3: int, ch5x5red: int, ch5x5: int,
                 pool_proj: int):
        super().__init__()
        self.branch1 = BasicConv2d(in_channels, ch1x1, 1)
        self.branch2 = nn.Sequential(BasicConv2d(in_channels, ch3x3red, 1), BasicConv2d(ch3x3red, ch3x3, 3, padding=1))
        self.branch3 = nn.Sequential(BasicConv2d(in_channels, ch5x5red, 1), BasicConv2d(ch5x5red, ch5x5, 3, padding=1))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), BasicConv2d(in_channels, pool_proj, 1))

    @property
    def out_channels(self) -> int:
        return sum(b.bn.num_features if isinstance(b, BasicConv2d) else b[-1].bn.num_features
                   for b in (self.branch1, self.branch2, self.branch3, self.branch4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionSmall(nn.Module):
    """A GoogLeNet-shaped classifier for small images (about 0.2 M parameters).

    Strides follow GoogLeNet: stride 4 after the first conv and pool, 8 at inception3, 16 at
    inception4, 32 at inception5 (64 px input → 8, 4, 2 px maps).
    """

    def __init__(self, num_classes: int = 10, width: float = 1.0, dropout: float = 0.2):
        super().__init__()

        def c(n: int) -> int:
            return max(4, int(round(n * width)))

        self.conv1 = BasicConv2d(3, c(24), 3, stride=2, padding=1)
        self.maxpool1 = nn.MaxPool2d(2)
        self.conv2 = BasicConv2d(c(24), c(32), 1)
        self.conv3 = BasicConv2d(c(32), c(48), 3, padding=1)
        self.maxpool2 = nn.MaxPool2d(2)
        self.inception3a = Inception(c(48), c(16), c(24), c(32), c(8), c(16), c(16))
        self.inception3b = Inception(self.inception3a.out_channels, c(32), c(32), c(48), c(8), c(16), c(16))
        self.maxpool3 = nn.MaxPool2d(2)
        self.inception4a = Inception(self.inception3b.out_channels, c(48), c(32), c(64), c(8), c(16), c(32))
        self.inception4b = Inception(self.inception4a.out_channels, c(48), c(48), c(64), c(12), c(24), c(32))
        self.maxpool4 = nn.MaxPool2d(2)
        self.inception5a = Inception(self.inception4b.out_channels, c(64), c(48), c(96), c(16), c(32), c(32))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(self.inception5a.out_channels, num_classes)
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool2(self.conv3(self.conv2(self.maxpool1(self.conv1(x)))))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.maxpool4(self.inception4b(self.inception4a(x)))
        return torch.flatten(self.avgpool(self.inception5a(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.forward_features(x)))


class ResidualBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ObserverNet(nn.Module):
    """A small residual network, independent of the studied net, whose pooled features embed images."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (24, 48, 96)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        layers, in_ch = [], widths[0]
        for i, w in enumerate(widths):
            layers.append(ResidualBlock(in_ch, w, stride=1 if i == 0 else 2))
            in_ch = w
        self.layers = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.layers(self.stem(x))), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
