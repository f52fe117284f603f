"""Feature pyramid neck: brings the backbone taps to one channel width, adding coarse context to fine levels."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FPN(nn.Module):
    """Lateral 1x1 convs, top-down nearest upsample + add, and a 3x3 smoothing conv per level.

    ``smooth=False`` drops the smoothing convs (the head's shared 3x3 conv follows anyway): about a third of the
    neck and head's cost, for the deployments that need ``forward_all`` closer to the backbone's latency.
    """

    def __init__(self, in_channels: tuple[int, ...], channels: int = 64, smooth: bool = True) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.smooth = nn.ModuleList(
            nn.Conv2d(channels, channels, 3, padding=1) if smooth else nn.Identity() for _ in in_channels
        )
        self.channels = channels

    def forward(self, feats: list[torch.Tensor], levels: tuple[int, ...] | None = None) -> dict[int, torch.Tensor]:
        """Pyramid maps by level index (0 = finest); only ``levels`` (default all) are smoothed and returned.

        The top-down path stops at the finest requested level, so asking only for the coarsest
        level skips the finer laterals entirely.
        """
        levels = tuple(range(len(feats))) if levels is None else levels
        finest = min(levels)
        out = {}
        top = None
        for i in range(len(feats) - 1, finest - 1, -1):
            lat = self.lateral[i](feats[i])
            top = lat if top is None else lat + F.interpolate(top, size=lat.shape[-2:], mode="nearest")
            if i in levels:
                out[i] = self.smooth[i](top)
        return out
