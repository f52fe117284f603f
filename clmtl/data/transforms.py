"""Joint image + target augmentation through torchvision.transforms.v2, for every target kind.

Targets are wrapped as tv_tensors (``Mask`` for label maps, ``BoundingBoxes`` for boxes), so geometry
follows the image; class ids pass through untouched.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from clmtl.stream.tasks import DETECTION, SEGMENTATION


class JointTransform(Dataset):
    """``dataset`` with ``transform`` applied to each ``(image, target)`` pair of the given task kind."""

    def __init__(self, dataset: Dataset, kind: str, transform: v2.Transform) -> None:
        self.dataset = dataset
        self.kind = kind
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any]:
        image, target = self.dataset[i]
        image = tv_tensors.Image(image)
        if self.kind == SEGMENTATION:
            image, mask = self.transform(image, tv_tensors.Mask(target))
            return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)
        if self.kind == DETECTION:
            boxes = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=tuple(image.shape[-2:]))
            image, boxes = self.transform(image, boxes)
            return image.as_subclass(torch.Tensor), {**target, "boxes": boxes.as_subclass(torch.Tensor)}
        return self.transform(image).as_subclass(torch.Tensor), target


class RandomHueRotation(v2.Transform):
    """Rotate the colours of an image about the grey axis by a random angle of up to ``max_turn`` turns each way.

    A hue shift that keeps grey pixels and each pixel's channel mean (up to clipping to [0, 1]), as one 3x3 matrix
    product per image: ``v2.ColorJitter(hue=)`` goes through HSV and costs several times more (docs/studies.md,
    Training speed). Masks and boxes pass untouched.
    """

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, max_turn: float) -> None:
        super().__init__()
        self.max_turn = max_turn

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        turn = torch.empty(()).uniform_(-self.max_turn, self.max_turn)
        return {"matrix": hue_rotation_matrix(2 * math.pi * float(turn))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        rotated = torch.einsum("ij,...jhw->...ihw", params["matrix"].to(inpt.dtype), inpt).clamp_(0, 1)
        return tv_tensors.wrap(rotated, like=inpt)


def hue_rotation_matrix(angle: float) -> torch.Tensor:
    """Rodrigues' rotation by ``angle`` radians about the grey axis (1, 1, 1), as a 3x3 matrix."""
    cos, sin = math.cos(angle), math.sin(angle)
    cross = torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]], dtype=torch.float64) / math.sqrt(3)
    axis_outer = torch.full((3, 3), 1 / 3, dtype=torch.float64)
    return (cos * torch.eye(3, dtype=torch.float64) + sin * cross + (1 - cos) * axis_outer).float()


def train_augmentation(dataset: Dataset, kind: str, hflip: float, hue: float = 0.0) -> Dataset:
    """Training-time augmentation: a random horizontal flip with probability ``hflip`` and a random hue shift of up
    to ``hue`` turns of the colour wheel (0.5: any hue); identity when both are 0."""
    transforms = [*([v2.RandomHorizontalFlip(p=hflip)] if hflip else []), *([RandomHueRotation(hue)] if hue else [])]
    if not transforms:
        return dataset
    return JointTransform(dataset, kind, v2.Compose(transforms) if len(transforms) > 1 else transforms[0])
