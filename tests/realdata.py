"""Tiny datasets written in the real on-disk formats (COCO JSON + images, VOC, class folders), for tests.

Each writer puts files under ``root`` and returns what it wrote (paths, pixels, annotations), so a test can check a
loader against the truth. Images are small, non-square and of different sizes, so letterboxing is exercised.
The VOC palette is spelled out here rather than computed, as an independent reference for the loader's colour map.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

# --- pixels ---------------------------------------------------------------------------------------------------


def pattern(height: int, width: int, seed: int) -> np.ndarray:
    """A uint8 ``[h, w, 3]`` picture of 8-pixel colour blocks (compresses well, survives JPEG roughly)."""
    blocks = np.random.default_rng(seed).integers(0, 256, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return np.kron(blocks, np.ones((8, 8, 1), dtype=np.uint8))[:height, :width]


def write_image(path: Path, pixels: np.ndarray) -> Path:
    """Save ``pixels`` (uint8 ``[h, w, 3]`` or ``[h, w]``) in the format the suffix names, creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


# --- COCO -----------------------------------------------------------------------------------------------------

COCO_CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 42, "name": "bird"}]
"""Non-contiguous ids, as COCO's own are."""

COCO_IMAGES = [
    {"id": 4, "file_name": "wide.jpg", "height": 40, "width": 64},
    {"id": 9, "file_name": "tall.png", "height": 64, "width": 36},
    {"id": 17, "file_name": "nested/empty.jpg", "height": 48, "width": 48},  # no annotation
    {"id": 23, "file_name": "small.png", "height": 24, "width": 50},
]

COCO_ANNOTATIONS = [  # bbox is xywh in original pixels; "iscrowd" defaults to 0
    {"id": 1, "image_id": 4, "category_id": 3, "bbox": [4.5, 6.0, 20.0, 14.0]},
    {"id": 2, "image_id": 4, "category_id": 42, "bbox": [30.0, 10.0, 25.5, 22.0]},
    {"id": 3, "image_id": 4, "category_id": 7, "bbox": [50.0, 20.0, 20.0, 30.0]},  # crosses the right/bottom edge
    {"id": 5, "image_id": 9, "category_id": 7, "bbox": [2.0, 30.0, 30.0, 30.0], "iscrowd": 1},
    {"id": 6, "image_id": 9, "category_id": 7, "bbox": [5.0, 3.0, 20.0, 25.0]},
    {"id": 8, "image_id": 9, "category_id": 3, "bbox": [10.0, 40.0, 12.0, 15.0]},
    {"id": 11, "image_id": 23, "category_id": 42, "bbox": [1.0, 2.0, 18.0, 20.0]},
    {"id": 12, "image_id": 23, "category_id": 3, "bbox": [25.0, 4.0, 20.0, 12.5]},
]


@dataclass
class WrittenCoco:
    images_dir: Path
    annotation_file: Path
    data: dict  # the JSON as written
    pixels: dict[str, np.ndarray] = field(default_factory=dict)  # file_name -> what was encoded


def write_coco(root: Path, images: Sequence[dict] = COCO_IMAGES, annotations: Sequence[dict] = COCO_ANNOTATIONS,
               categories: Sequence[dict] = COCO_CATEGORIES, split: str = "train") -> WrittenCoco:
    """``root/{split}/<file_name>`` images (pattern seeded by id) and ``root/annotations/instances_{split}.json``.

    Annotations get ``area`` (box area) and ``iscrowd`` (0) when missing, so pycocotools can evaluate the file.
    """
    images_dir = root / split
    pixels = {}
    for info in images:
        pixels[info["file_name"]] = pattern(info["height"], info["width"], seed=info["id"])
        write_image(images_dir / info["file_name"], pixels[info["file_name"]])
    data = {
        "images": [dict(info) for info in images],
        "annotations": [{"iscrowd": 0, "area": a["bbox"][2] * a["bbox"][3], **a} for a in annotations],
        "categories": [dict(c) for c in categories],
    }
    annotation_file = root / "annotations" / f"instances_{split}.json"
    annotation_file.parent.mkdir(parents=True, exist_ok=True)
    annotation_file.write_text(json.dumps(data))
    return WrittenCoco(images_dir, annotation_file, data, pixels)


# --- VOC ------------------------------------------------------------------------------------------------------

VOC_PALETTE = [
    (0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128), (0, 128, 128),
    (128, 128, 128), (64, 0, 0), (192, 0, 0), (64, 128, 0), (192, 128, 0), (64, 0, 128), (192, 0, 128),
    (64, 128, 128), (192, 128, 128), (0, 64, 0), (128, 64, 0), (0, 192, 0), (128, 192, 0), (0, 64, 128),
]
"""The colours of VOC's 21 classes as the devkit's SegmentationClass PNGs use them; void (255) is (224, 224, 192)."""
VOC_VOID = (224, 224, 192)

VOC_SAMPLES = {  # split -> (id, (height, width))
    "train": [("2007_000032", (40, 56)), ("2007_000039", (48, 32)), ("2008_000123", (30, 30))],
    "val": [("2009_000001", (36, 50)), ("2009_000002", (44, 44))],
}


@dataclass
class VocSample:
    id: str
    image_file: Path
    mask_file: Path
    pixels: np.ndarray  # uint8 [h, w, 3] as encoded
    labels: np.ndarray  # uint8 [h, w] class indices, 255 = void


def voc_labels(height: int, width: int, seed: int) -> np.ndarray:
    """Background with two class rectangles, each outlined in void (255) as VOC masks are."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((height, width), dtype=np.uint8)
    for label in rng.choice(np.arange(1, 21), size=2, replace=False):
        y0, x0 = rng.integers(0, height // 2), rng.integers(0, width // 2)
        y1, x1 = y0 + rng.integers(6, height // 2 + 1), x0 + rng.integers(6, width // 2 + 1)
        labels[y0:y1, x0:x1] = 255
        labels[y0 + 1:y1 - 1, x0 + 1:x1 - 1] = label
    return labels


def write_mask(path: Path, labels: np.ndarray, mask_format: str = "palette") -> Path:
    """A mask PNG: ``"palette"`` (mode P, indices = classes, VOC's own), ``"rgb"`` (VOC colours) or ``"grey"``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[: len(VOC_PALETTE)] = VOC_PALETTE
    palette[255] = VOC_VOID
    if mask_format == "palette":
        image = Image.fromarray(labels, mode="P")
        image.putpalette(palette.flatten().tolist())
    elif mask_format == "rgb":
        image = Image.fromarray(palette[labels])
    elif mask_format == "grey":
        image = Image.fromarray(labels, mode="L")
    else:
        raise ValueError(f"unknown mask format {mask_format!r}")
    image.save(path)
    return path


@dataclass
class WrittenVoc:
    root: Path
    splits: dict[str, list[VocSample]]


def write_voc(root: Path, layout: str = "voc", samples: dict = VOC_SAMPLES, mask_format: str = "palette",
              image_suffix: str = ".png") -> WrittenVoc:
    """A VOC dataset in ``layout`` ``"voc"`` (JPEGImages + SegmentationClass + ImageSets/Segmentation/{split}.txt)
    or ``"folders"`` (``root/{split}/JPEGImages`` + ``root/{split}/SegmentationClass``, no ImageSets).

    Images are PNG by default despite the folder name so tests can compare pixels exactly; the ``"voc"`` layout
    always writes ``{id}.jpg`` as VOC does.
    """
    written: dict[str, list[VocSample]] = {}
    for split, entries in samples.items():
        base = root if layout == "voc" else root / split
        suffix = ".jpg" if layout == "voc" else image_suffix
        written[split] = []
        for index, (sample_id, (height, width)) in enumerate(entries):
            pixels, labels = pattern(height, width, seed=index), voc_labels(height, width, seed=index)
            image_file = write_image(base / "JPEGImages" / f"{sample_id}{suffix}", pixels)
            mask_file = write_mask(base / "SegmentationClass" / f"{sample_id}.png", labels, mask_format)
            written[split].append(VocSample(sample_id, image_file, mask_file, pixels, labels))
        if layout == "voc":
            split_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
            split_file.parent.mkdir(parents=True, exist_ok=True)
            split_file.write_text("".join(f"{sample_id}\n" for sample_id, _ in entries))
        elif layout != "folders":
            raise ValueError(f"unknown layout {layout!r}")
    return WrittenVoc(root, written)


# --- class folders --------------------------------------------------------------------------------------------

FOLDER_CLASSES = ("n03888605", "n01440764", "my_class")  # two Imagenette wnids and a folder of our own
FOLDER_COUNTS = {"train": 3, "val": 2}


@dataclass
class WrittenFolder:
    root: Path
    files: dict[str, list[tuple[Path, str]]]  # split -> (image file, class folder), images only
    ignored: list[Path]  # non-image files written alongside


def write_folder(root: Path, classes: Sequence[str] = FOLDER_CLASSES, counts: dict[str, int] = FOLDER_COUNTS,
                 ) -> WrittenFolder:
    """``root/{split}/<class>/<class>_<i>.JPEG`` (every other one ``.png``), plus a ``notes.txt`` per class folder
    and a ``README.md`` in each split folder, which loaders must ignore. Sizes vary between 24 and 56 pixels."""
    files: dict[str, list[tuple[Path, str]]] = {}
    ignored = []
    for split, count in counts.items():
        files[split] = []
        for c, folder in enumerate(classes):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                suffix = ".JPEG" if i % 2 == 0 else ".png"
                seed = 100 * c + 10 * i + len(split)
                size = (24 + 8 * ((i + c) % 4), 56 - 8 * (i % 3))
                path = write_image(root / split / folder / f"{folder}_{i}{suffix}", pattern(*size, seed=seed))
                files[split].append((path, folder))
            ignored.append(root / split / folder / "notes.txt")
            ignored[-1].write_text("not an image")
        ignored.append(root / split / "README.md")
        ignored[-1].write_text("not a class")
    return WrittenFolder(root, files, ignored)
