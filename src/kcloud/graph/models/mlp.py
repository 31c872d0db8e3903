"""A residual MLP classifier: input projection, pre-norm MLP blocks, head."""

from __future__ import annotations

import torch
from torch import nn


class MLPBlock(nn.Module):
    def __init__(self, width: int, expansion: int = 4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width * expansion)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(width * expansion, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class MLPNet(nn.Module):
    """Features [batch, in_features] -> class logits [batch, classes]."""

    def __init__(
        self, in_features: int = 784, width: int = 512, depth: int = 4, classes: int = 10,
        expansion: int = 4,
    ) -> None:
        super().__init__()
        self.input_proj = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList(MLPBlock(width, expansion) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.input_proj(x)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))
