"""A researcher's own classifier, as it might live in their project: attriflow imports it
through ``model.factory: "configs/models/small_cnn.py:build"`` (see configs/factory.yaml).

Its forward returns ``(logits, embedding)``, as many research models do; the config's
``model.output: {index: 0}`` tells attriflow which part is the logits.
"""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU stages, global average pooling and a linear head."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        stages, c_in = [], 3
        for i in range(3):
            c_out = width * 2**i
            stages += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                       nn.MaxPool2d(2) if i < 2 else nn.Identity()]
            c_in = c_out
        self.features = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.pool(self.features(x)).flatten(1)
        return self.head(embedding), embedding


def build(num_classes: int = 10, width: int = 16) -> nn.Module:
    """The model with random weights (attriflow seeds the draw with ``model.init_seed``)."""
    return SmallCNN(num_classes, width)
