"""A small U-Net (Ronneberger et al. 2015): each encoder stage's output is carried, as a skip
connection, to the decoder stage of the same resolution."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn


class ConvBlock(nn.Module):
    """Two 3x3 convolutions, each with batch norm and ReLU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Down(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.block = ConvBlock(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.pool(x))


class Up(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, 2, stride=2)
        self.block = ConvBlock(2 * cout, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([self.up(x), skip], dim=1))


class UNet(nn.Module):
    """Images [batch, C, H, W] -> per-pixel class logits [batch, classes, H, W]."""

    def __init__(
        self, in_channels: int = 3, classes: int = 2, widths: Sequence[int] = (16, 32, 64, 128)
    ) -> None:
        super().__init__()
        self.widths = tuple(widths)
        self.stem = ConvBlock(in_channels, widths[0])
        pairs = list(itertools.pairwise(widths))
        self.down = nn.ModuleList(Down(a, b) for a, b in pairs)
        self.up = nn.ModuleList(Up(b, a) for a, b in reversed(pairs))
        self.head = nn.Conv2d(widths[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        skips = []
        for stage in self.down:
            skips.append(x)
            x = stage(x)
        for stage in self.up:
            x = stage(x, skips.pop())
        return self.head(x)
