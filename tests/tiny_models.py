"""Tiny named models shared by several test files, the no-hooks-left check, and the architecture
parameters that mark full-size networks slow."""
from __future__ import annotations

import pytest
import torch
from torch import nn

#: Registry networks at full ImageNet size: building one takes seconds on 2 CPU cores.
FULL_SIZE = ("googlenet", "resnet50", "vgg16")

HOOK_KINDS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


class TwoConvNet(nn.Module):
    """conv1 (3 → 8) → ReLU → conv2 (8 → 12) → ReLU → spatial mean → fc (12 → 5).

    Convs with biases and no BatchNorm, so a masked filter still outputs relu(bias)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


class TinyGoogLeNetBlock(nn.Module):
    """A stem and one of torchvision's GoogLeNet inception blocks (``inception3a``), whose branches end in
    ``F.relu(x, inplace=True)`` as in the full network, then a spatial mean and a classifier (10 classes)."""

    def __init__(self):
        super().__init__()
        from torchvision.models.googlenet import BasicConv2d, Inception

        self.conv1 = BasicConv2d(3, 8, kernel_size=3, padding=1)
        self.inception3a = Inception(8, 4, 4, 6, 2, 4, 2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.inception3a(self.conv1(x)).mean((2, 3)))


def assert_no_hooks(model: nn.Module) -> None:
    """No forward, forward-pre, backward or backward-pre hook is left on ``model`` or its submodules."""
    left = {name or "<model>": [kind for kind in HOOK_KINDS if getattr(module, kind)]
            for name, module in model.named_modules()}
    left = {name: kinds for name, kinds in left.items() if kinds}
    assert not left, f"hooks left on {left}"


def archs(*names: str) -> list:
    """``names`` as pytest parameters, the full-size ones (:data:`FULL_SIZE`) marked ``slow``."""
    return [pytest.param(name, marks=pytest.mark.slow) if name in FULL_SIZE else name for name in names]
