"""Pascal VOC semantic segmentation (images + class-index PNG masks) as a letterboxed segmentation dataset.

Two layouts, tried in this order:

- VOC: ``root/ImageSets/Segmentation/{split}.txt`` lists ids; ``root/JPEGImages/{id}.jpg`` and
  ``root/SegmentationClass/{id}.png``;
- split by folder (no ImageSets): ``root/{split}/JPEGImages/*`` paired by file stem with
  ``root/{split}/SegmentationClass/{stem}.png``.

Masks are palette ("P") or greyscale ("L") PNGs whose values are class indices, or RGB PNGs painted with the VOC
colour map (class ``i`` in colour ``voc_colormap()[i]``, void in (224, 224, 192)). 255 is void (ignored).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torchvision import tv_tensors

from clmtl.data.images import CachedImageDataset, Loaded, is_image_file, load_letterboxed, open_image
from clmtl.errors import DataError
from clmtl.stream.tasks import IGNORE_INDEX, SEGMENTATION

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
VOID_COLOUR = (224, 224, 192)


def voc_colormap(n: int = 256) -> np.ndarray:
    """The VOC palette, uint8 ``[n, 3]``: bit ``3j + c`` of the index sets bit ``7 - j`` of channel ``c``."""
    colours = np.zeros((n, 3), dtype=np.uint8)
    for index in range(n):
        code = index
        for bit in range(8):
            for channel in range(3):
                colours[index, channel] |= ((code >> channel) & 1) << (7 - bit)
            code >>= 3
    return colours


class VocSegmentation(CachedImageDataset):
    """Segmentation samples of one split; target ``LongTensor[S, S]`` letterboxed (nearest), padding 255."""

    kind = SEGMENTATION

    def __init__(self, root: str | Path, split: str, image_size: int, classes: Sequence[str] = VOC_CLASSES,
                 on_bad_sample: str = "error", subset: int | None = None, seed: int = 0) -> None:
        self.root = Path(root)
        self.classes = tuple(classes)
        self.image_size = image_size
        super().__init__(f"{self.root} (split {split!r})", _list_pairs(self.root, split), self._load,
                         on_bad_sample, subset, seed)

    has_original_targets = True

    def target(self, i: int) -> Tensor:
        return self.targets[i].long()  # stored as uint8

    def original_target(self, i: int) -> Tensor:
        """Sample ``i``'s mask as its file has it ``[h, w]``, read again (evaluation scores at this resolution)."""
        return torch.from_numpy(read_label_map(self.sources[i][1], self.root, len(self.classes))).long()

    def _load(self, pair: tuple[str, str]) -> Loaded:
        image_path, mask_path = pair
        image, meta = load_letterboxed(image_path, self.root, self.image_size)
        labels = read_label_map(mask_path, self.root, len(self.classes))
        if labels.shape != meta.original_size:
            raise DataError(f"{self.root / mask_path}: mask is {labels.shape[1]}x{labels.shape[0]} but its image "
                            f"{meta.file.name} is {meta.original_size[1]}x{meta.original_size[0]} (width x height)")
        mask = meta.letterbox.apply(tv_tensors.Mask(torch.from_numpy(labels)[None]), self.image_size)[0]
        return image, mask, meta


def read_label_map(path: str | Path, root: str | Path, num_classes: int) -> np.ndarray:
    """A mask PNG as uint8 class indices ``[h, w]`` (255 = void); any other value raises ``DataError``."""
    mask = open_image(path, root)
    file = Path(root) / path
    if mask.mode in ("P", "L"):
        labels = np.array(mask)  # a writable copy
    elif mask.mode == "RGB":
        labels = _colours_to_labels(np.asarray(mask), num_classes, file)
    else:
        raise DataError(f"{file}: mask mode {mask.mode!r}; expected a palette, greyscale or RGB PNG")
    invalid = np.unique(labels[(labels >= num_classes) & (labels != IGNORE_INDEX)])
    if invalid.size:
        raise DataError(f"{file}: mask values {invalid[:5].tolist()} are neither a class (0..{num_classes - 1}) "
                        f"nor void ({IGNORE_INDEX})")
    return labels


def _colours_to_labels(rgb: np.ndarray, num_classes: int, file: Path) -> np.ndarray:
    weights = np.array([1 << 16, 1 << 8, 1])
    label_of = {int(code): label for label, code in enumerate(voc_colormap(num_classes).astype(np.int64) @ weights)}
    label_of[int(np.array(VOID_COLOUR) @ weights)] = IGNORE_INDEX
    codes, inverse = np.unique(rgb.astype(np.int64) @ weights, return_inverse=True)
    unknown = [int(code) for code in codes if int(code) not in label_of]
    if unknown:
        colour = (unknown[0] >> 16, (unknown[0] >> 8) & 255, unknown[0] & 255)
        raise DataError(f"{file}: colour {colour} is neither one of the {num_classes} class colours of the VOC "
                        f"colour map nor the void colour {VOID_COLOUR}")
    return np.array([label_of[int(code)] for code in codes], dtype=np.uint8)[inverse].reshape(rgb.shape[:2])


def _list_pairs(root: Path, split: str) -> list[tuple[str, str]]:
    """(image, mask) paths relative to ``root``, sorted by id, from whichever layout ``root`` has."""
    split_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if split_file.is_file():
        ids = sorted({line.strip() for line in split_file.read_text().splitlines() if line.strip()})
        return [(f"JPEGImages/{i}.jpg", f"SegmentationClass/{i}.png") for i in ids]
    image_dir = root / split / "JPEGImages"
    if image_dir.is_dir():
        images = sorted(p for p in image_dir.iterdir() if p.is_file() and is_image_file(p))
        return [(f"{split}/JPEGImages/{p.name}", f"{split}/SegmentationClass/{p.stem}.png") for p in images]
    raise DataError(f"{root}: no VOC layout for split {split!r}: expected {split_file} or {image_dir}/")
