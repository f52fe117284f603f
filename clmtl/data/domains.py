"""Domain shifts: one fixed change of every image of a task, training and validation alike, so that one dataset
becomes a stream of domains (Permuted MNIST: a pixel shuffle per task; Rotated MNIST: an angle per task).

A permutation is drawn from the run's seed and its index alone, so the same seed gives the same stream, and index 0
is the identity (the papers' first task is the original data). It shuffles pixel positions, the same way in every
channel.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as F

from clmtl.data.relabel import targets_of
from clmtl.data.views import DatasetView

_INDEX_STRIDE = 1_000_003
"""Separates the generators of a seed's permutations from those of the next seed."""


def pixel_permutation(num_pixels: int, seed: int, index: int) -> Tensor:
    """The ``index``-th permutation of ``num_pixels`` positions for ``seed``; index 0 is the identity."""
    if index == 0:
        return torch.arange(num_pixels)
    generator = torch.Generator().manual_seed(seed * _INDEX_STRIDE + index)
    return torch.randperm(num_pixels, generator=generator)


class DomainShifted(DatasetView):
    """``dataset``'s ``(image, target)`` samples with every image permuted (``permute``: the permutation's index) or
    rotated (``rotate``: degrees counter-clockwise, bilinear, corners filled with 0)."""

    def __init__(self, dataset: Dataset, seed: int, permute: int | None = None, rotate: float | None = None) -> None:
        if (permute is None) == (rotate is None):
            raise ValueError("a domain shift is a permutation or a rotation")
        self.dataset, self.angle = dataset, rotate
        self.permutation = None
        if permute is not None:
            height, width = dataset[0][0].shape[-2:]
            self.permutation = pixel_permutation(height * width, seed, permute)
        self.kind = getattr(dataset, "kind", None)
        self.classes = getattr(dataset, "classes", None)
        self._targets = targets_of(dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Tensor, Any]:
        image, target = self.dataset[i]
        return self.shift(image), target

    def shift(self, image: Tensor) -> Tensor:
        """One ``[C, H, W]`` image in this domain."""
        if self.permutation is not None:
            return image.flatten(-2)[..., self.permutation].view_as(image)
        return F.rotate(image, self.angle, interpolation=F.InterpolationMode.BILINEAR)

    def target(self, i: int) -> Any:
        """Target ``i``, without touching the image."""
        return self._targets[i]
