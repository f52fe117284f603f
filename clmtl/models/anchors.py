"""YOLOv3-style anchor boxes: which (w, h) priors each detection level predicts around.

The layout is plain data (hashable, frozen) so the model, the loss and the decoder can share it and
cache tensors built from it.
"""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_IMAGE_SIZE = 128

DEFAULT_ANCHORS: tuple[tuple[tuple[float, float], ...], ...] = (
    ((12.0, 12.0), (20.0, 14.0), (14.0, 20.0)),  # stride 8
    ((24.0, 24.0), (36.0, 24.0), (24.0, 36.0)),  # stride 16
    ((44.0, 44.0), (60.0, 40.0), (40.0, 60.0)),  # stride 32
)
"""Per level, a square, a wide and a tall prior, for 128-px images with objects of 12-60 px."""


@dataclass(frozen=True)
class AnchorLayout:
    """Strides of the detection levels and, per level, the (w, h) anchors in input pixels."""

    strides: tuple[int, ...] = (8, 16, 32)
    anchors: tuple[tuple[tuple[float, float], ...], ...] = DEFAULT_ANCHORS

    def __post_init__(self) -> None:
        if len(self.strides) != len(self.anchors):
            raise ValueError(f"{len(self.strides)} strides but anchors for {len(self.anchors)} levels")
        counts = {len(level) for level in self.anchors}
        if len(counts) != 1 or 0 in counts:
            raise ValueError(f"every level needs the same, non-zero number of anchors; got {sorted(counts)}")
        if any(len(wh) != 2 or min(wh) <= 0 for level in self.anchors for wh in level):
            raise ValueError("each anchor must be a positive (w, h) pair")

    @property
    def num_anchors(self) -> int:
        """Anchors per level (A); the head predicts A boxes per cell."""
        return len(self.anchors[0])

    def scaled(self, factor: float) -> AnchorLayout:
        """The same layout with every anchor multiplied by ``factor`` (for another image size)."""
        anchors = tuple(tuple((w * factor, h * factor) for w, h in level) for level in self.anchors)
        return AnchorLayout(self.strides, anchors)

    @classmethod
    def for_image_size(cls, image_size: int) -> AnchorLayout:
        """Default anchors scaled from 128-px images to ``image_size``."""
        return cls().scaled(image_size / DEFAULT_IMAGE_SIZE)
