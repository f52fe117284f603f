"""Letterbox geometry: fit an image of any shape into an S x S square without distorting it, and map back.

The image is resized so its long side is S (aspect kept), then padded evenly to S x S: images with grey 114 (as
YOLO pads), label maps with 255 (ignored by losses and metrics). The recorded ``Letterbox(scale, pad_x, pad_y)``
maps boxes and dense predictions between the file's pixels ("original") and the model's ("model").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from clmtl.stream.tasks import IGNORE_INDEX

IMAGE_FILL = 114
MASK_FILL = IGNORE_INDEX

Size = tuple[int, int]  # (height, width)


@dataclass(frozen=True)
class Letterbox:
    """model = original * scale + (pad_x, pad_y); the resized image occupies ``inner_size`` from (pad_x, pad_y)."""

    scale: float
    pad_x: int
    pad_y: int

    @classmethod
    def fit(cls, original_size: Size, size: int) -> Letterbox:
        """The letterbox that puts an image of ``original_size`` (h, w) into a ``size`` x ``size`` square."""
        h, w = original_size
        if size < 1 or h < 1 or w < 1:
            raise ValueError(f"cannot letterbox an image of {original_size} (h, w) into {size} x {size}")
        scale = size / max(h, w)
        inner_h, inner_w = _inner_size(original_size, scale)
        return cls(scale, (size - inner_w) // 2, (size - inner_h) // 2)

    @classmethod
    def from_tensor(cls, values: Tensor) -> Letterbox:
        """Inverse of ``as_tensor`` (targets carry the letterbox as a tensor so it survives collation and devices)."""
        scale, pad_x, pad_y = values.tolist()
        return cls(float(scale), round(pad_x), round(pad_y))

    def as_tensor(self) -> Tensor:
        return torch.tensor([self.scale, self.pad_x, self.pad_y], dtype=torch.float32)

    def inner_size(self, original_size: Size) -> Size:
        """(h, w) of the resized image inside the square."""
        return _inner_size(original_size, self.scale)

    def apply(self, image: tv_tensors.Image | tv_tensors.Mask, size: int) -> Tensor:
        """Resize and pad ``[..., H, W]``: an ``Image`` bilinearly with 114 padding, a ``Mask`` nearest with 255."""
        inner_h, inner_w = self.inner_size(tuple(image.shape[-2:]))
        fill = MASK_FILL if isinstance(image, tv_tensors.Mask) else IMAGE_FILL
        resized = F.resize(image, [inner_h, inner_w], antialias=True)
        padding = [self.pad_x, self.pad_y, size - inner_w - self.pad_x, size - inner_h - self.pad_y]
        return F.pad(resized, padding, fill=fill).as_subclass(Tensor)

    def boxes_to_model(self, boxes: Tensor) -> Tensor:
        """xyxy boxes ``[N, 4]`` from original to model pixels."""
        return boxes * self.scale + boxes.new_tensor([self.pad_x, self.pad_y, self.pad_x, self.pad_y])

    def boxes_to_original(self, boxes: Tensor, original_size: Size) -> Tensor:
        """xyxy boxes ``[N, 4]`` from model to original pixels, clipped to the original image."""
        pad = boxes.new_tensor([self.pad_x, self.pad_y, self.pad_x, self.pad_y])
        return clip_boxes((boxes - pad) / self.scale, original_size)

    def logits_to_original(self, logits: Tensor, original_size: Size) -> Tensor:
        """A ``[C, S, S]`` score map back to ``[C, h, w]``: padding cropped, bilinear resize."""
        return F.resize(self._crop(logits, original_size), list(original_size), antialias=False)

    def _crop(self, values: Tensor, original_size: Size) -> Tensor:
        inner_h, inner_w = self.inner_size(original_size)
        return values[..., self.pad_y:self.pad_y + inner_h, self.pad_x:self.pad_x + inner_w]


def letterbox_image(image: Tensor, size: int) -> tuple[Tensor, Letterbox]:
    """Letterbox a ``[3, H, W]`` image into ``[3, size, size]``; also return the letterbox that did it."""
    box = Letterbox.fit(tuple(image.shape[-2:]), size)
    return box.apply(tv_tensors.Image(image), size), box


def clip_boxes(boxes: Tensor, image_size: Size) -> Tensor:
    """xyxy boxes ``[N, 4]`` clipped to an image of ``image_size`` (h, w)."""
    h, w = image_size
    return torch.minimum(boxes.clamp(min=0), boxes.new_tensor([w, h, w, h]))


def _inner_size(original_size: Size, scale: float) -> Size:
    h, w = original_size
    return max(1, round(h * scale)), max(1, round(w * scale))
