"""One head shared by every task and pyramid level: a 3x3 conv + BN + ReLU, then a single 1x1 conv.

The 1x1 conv's output channels are ``[A*(5+C_det) detection | C_seg segmentation]``; a task that
needs only part of them convolves with that slice of the weights, so it computes only its own channels.
Classification pools the shared 3x3 features of the coarsest level into a linear layer.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

OBJECTNESS_PRIOR = 0.01
"""Initial objectness probability: most anchors are background, so start there (as RetinaNet/YOLOv5 do)."""


class UnifiedHead(nn.Module):
    """Shared conv stem + one 1x1 prediction conv (det | seg channels) + a classifier on pooled features."""

    def __init__(
        self, channels: int, num_anchors: int, det_classes: int = 0, seg_classes: int = 0, cls_classes: int = 0
    ) -> None:
        super().__init__()
        self.shared = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)
        )
        self.num_anchors = num_anchors
        self.det_outputs = 5 + det_classes if det_classes else 0
        self.det_channels = num_anchors * self.det_outputs
        self.seg_channels = seg_classes
        total = self.det_channels + self.seg_channels
        self.pred = nn.Conv2d(channels, total, 1) if total else None
        self.classifier = nn.Linear(channels, cls_classes) if cls_classes else None
        if det_classes:
            self._init_detection_bias(det_classes)

    @torch.no_grad()
    def _init_detection_bias(self, det_classes: int) -> None:
        """Start objectness near its prior and classes near uniform (YOLOv5's bias init): faster, calmer start."""
        bias = self.pred.bias[: self.det_channels].view(self.num_anchors, self.det_outputs)
        bias[:, 4] = math.log(OBJECTNESS_PRIOR / (1 - OBJECTNESS_PRIOR))
        bias[:, 5:] = math.log(0.6 / (det_classes - 0.99))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The shared 3x3 conv + BN + ReLU, applied to one pyramid level."""
        return self.shared(x)

    def detection(self, h: torch.Tensor) -> torch.Tensor:
        """Raw detection output ``[B, A, H, W, 5 + C]`` of one level from its shared features."""
        out = F.conv2d(h, self.pred.weight[: self.det_channels], self.pred.bias[: self.det_channels])
        return self._split_anchors(out)

    def segmentation(self, h: torch.Tensor) -> torch.Tensor:
        """Segmentation logits ``[B, C_seg, H, W]`` at the level's resolution."""
        return F.conv2d(h, self.pred.weight[self.det_channels :], self.pred.bias[self.det_channels :])

    def detection_and_segmentation(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both outputs from one pass of the full 1x1 conv (used when all tasks run together)."""
        out = self.pred(h)
        return self._split_anchors(out[:, : self.det_channels]), out[:, self.det_channels :]

    def classification(self, h: torch.Tensor) -> torch.Tensor:
        """Class logits from globally averaged shared features."""
        return self.classifier(h.mean(dim=(2, 3)))

    def _split_anchors(self, out: torch.Tensor) -> torch.Tensor:
        b, _, hh, ww = out.shape
        return out.view(b, self.num_anchors, self.det_outputs, hh, ww).permute(0, 1, 3, 4, 2).contiguous()
