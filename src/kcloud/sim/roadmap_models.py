"""Models of the roadmap's built-in services (`file.py:factory` specs for the graph loader).

- `cctv_detector`: a single-stage detector on 640x640 CCTV frames: a ResNet-50 trunk
  (K-Cloud's zoo ResNet-50 without its classifier) and a RetinaNet-style dense head (one 3x3
  conv, then 9 anchors x (4 box + 1 objectness + 80 classes) logits per cell of the stride-32
  map). The head is simplified (one level, no feature pyramid); the trunk dominates the work.
- `medical_unet`: the zoo's U-Net at the width of Ronneberger et al. (64..1024 channels, 4
  down and 4 up stages) on 256x256 single-channel slices, 2 classes.
"""

from __future__ import annotations

import torch
from torch import nn

from kcloud.graph.models.resnet import resnet50
from kcloud.graph.models.unet import UNet

ANCHORS, COCO_CLASSES = 9, 80


class Detector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        r = resnet50()
        self.trunk = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool,
                                   *(getattr(r, n) for n in r.stages))
        self.head = nn.Sequential(nn.Conv2d(2048, 256, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(256, ANCHORS * (5 + COCO_CLASSES), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def cctv_detector() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return Detector().eval(), (torch.zeros(1, 3, 640, 640),)


def medical_unet() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return UNet(1, 2, (64, 128, 256, 512, 1024)).eval(), (torch.zeros(1, 1, 256, 256),)
