"""COCO detection files (instances JSON + an image folder) as a letterboxed detection dataset.

The JSON is schema-checked, then indexed with pycocotools' ``COCO``. Categories keep the file's ids in
``category_ids`` (label -> id) so scores can be reported in the file's own terms; a subset of classes is chosen by
name. Each target holds two views of the same annotations:

- training: non-crowd boxes clipped to the image, empty ones dropped (one warning counts them), in model pixels;
- ``"original"``: every annotation of the kept categories, crowd included, exactly as the file has it, plus the
  image size, so ``CocoMAP`` scores in original pixels what COCOeval run on the file itself would score.

An image whose decoded size (after EXIF orientation) differs from the JSON's ``width``/``height`` is a bad sample
(``DataError``; dropped under ``on_bad_sample="skip"``): its boxes would land in the wrong place.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from pathlib import Path
from typing import Sequence

import torch
from pycocotools.coco import COCO

from clmtl.data.images import CachedImageDataset, Loaded, load_letterboxed
from clmtl.data.letterbox import clip_boxes
from clmtl.errors import DataError
from clmtl.stream.tasks import DETECTION

_REQUIRED = {
    "images": (("id", int), ("file_name", str)),
    "annotations": (("id", int), ("image_id", int), ("category_id", int), ("bbox", list)),
    "categories": (("id", int), ("name", str)),
}
_OPTIONAL = {"images": (("width", int), ("height", int)), "annotations": (("iscrowd", int),), "categories": ()}


class CocoDetection(CachedImageDataset):
    """Detection samples of one COCO split; targets as the module docstring describes, ``image_id`` the file's id."""

    kind = DETECTION

    def __init__(self, images_dir: str | Path, annotation_file: str | Path, image_size: int,
                 classes: Sequence[str] | None = None, keep_empty: bool = True, on_bad_sample: str = "error",
                 subset: int | None = None, seed: int = 0) -> None:
        self.images_dir = Path(images_dir)
        self.annotation_file = Path(annotation_file)
        self.image_size = image_size
        coco = load_coco(self.annotation_file)
        self.category_ids, self.classes = _select_categories(coco, classes, self.annotation_file)
        self._label_of = {category: label for label, category in enumerate(self.category_ids)}
        samples = []
        for image_id in sorted(coco.getImgIds()):
            annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image_id], catIds=list(self.category_ids)))
            if annotations or keep_empty:
                samples.append((coco.imgs[image_id], annotations))
        self._empty_boxes: dict[str, int] = {}
        super().__init__(self.annotation_file, samples, self._load, on_bad_sample, subset, seed)
        if self._empty_boxes:
            files = ", ".join(list(self._empty_boxes)[:5]) + (", ..." if len(self._empty_boxes) > 5 else "")
            warnings.warn(f"{self.annotation_file}: dropped {sum(self._empty_boxes.values())} box(es) of zero size "
                          f"after clipping to the image from the training targets of: {files}", stacklevel=2)

    def _load(self, sample: tuple[dict, list[dict]]) -> Loaded:
        info, annotations = sample
        image, meta = load_letterboxed(info["file_name"], self.images_dir, self.image_size, info["id"])
        h, w = meta.original_size
        declared = (info.get("height", h), info.get("width", w))
        if declared != (h, w):
            hint = " (swapped: annotations made without the EXIF orientation?)" if declared == (w, h) else ""
            raise DataError(f"{meta.file}: image is {w}x{h} pixels upright but {self.annotation_file} says "
                            f"{declared[1]}x{declared[0]} (width x height){hint}")
        boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        labels = torch.tensor([self._label_of[a["category_id"]] for a in annotations], dtype=torch.long)
        crowd = torch.tensor([bool(a.get("iscrowd", 0)) for a in annotations], dtype=torch.bool)
        clipped = clip_boxes(boxes, (h, w))
        train = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1]) & ~crowd
        if int((~crowd).sum()) > int(train.sum()):
            self._empty_boxes[info["file_name"]] = int((~crowd).sum()) - int(train.sum())
        target = {
            "boxes": meta.letterbox.boxes_to_model(clipped[train]).float(),
            "labels": labels[train],
            "image_id": info["id"],
            "letterbox": meta.letterbox.as_tensor(),
            "original": {"boxes": boxes, "labels": labels, "iscrowd": crowd, "size": (h, w)},
        }
        return image, target, meta


def load_coco(annotation_file: Path) -> COCO:
    """The annotation file, schema-checked, as a pycocotools ``COCO`` index (its prints silenced)."""
    try:
        data = json.loads(annotation_file.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise DataError(f"{annotation_file}: annotation file not found") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{annotation_file}: not valid JSON: {error}") from error
    _check_schema(data, annotation_file)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = data
        coco.createIndex()
    return coco


def _check_schema(data: object, file: Path) -> None:
    """Types, unique ids and references of the parts we read; the first problem found raises, naming the entry."""
    if not isinstance(data, dict):
        raise DataError(f"{file}: expected a JSON object with 'images', 'annotations' and 'categories'")
    ids: dict[str, set[int]] = {}
    for section, required in _REQUIRED.items():
        entries = data.get(section)
        if not isinstance(entries, list):
            raise DataError(f"{file}: {section!r} must be a list, got {type(entries).__name__}")
        for index, entry in enumerate(entries):
            where = f"{file}: {section}[{index}]"
            if not isinstance(entry, dict):
                raise DataError(f"{where} must be an object")
            for field, kind in required + tuple(f for f in _OPTIONAL[section] if f[0] in entry):
                if not isinstance(entry.get(field), kind) or isinstance(entry.get(field), bool):
                    raise DataError(f"{where}.{field} must be {kind.__name__}, got {entry.get(field)!r}")
        ids[section] = {entry["id"] for entry in entries}
        if len(ids[section]) != len(entries):
            raise DataError(f"{file}: {section} ids are not unique")
    if not data["categories"]:
        raise DataError(f"{file}: no category ('categories' is an empty list)")
    for index, annotation in enumerate(data["annotations"]):
        where = f"{file}: annotations[{index}] (id {annotation['id']})"
        bbox = annotation["bbox"]
        if len(bbox) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox):
            raise DataError(f"{where}: bbox must be 4 finite numbers [x, y, width, height], got {bbox!r}")
        if bbox[2] < 0 or bbox[3] < 0:  # zero is a degenerate box (dropped from training); negative is an error
            raise DataError(f"{where}: bbox width and height must not be negative, got {bbox!r}")
        if annotation["image_id"] not in ids["images"]:
            raise DataError(f"{where}: unknown image id {annotation['image_id']}")
        if annotation["category_id"] not in ids["categories"]:
            raise DataError(f"{where}: unknown category id {annotation['category_id']}")


def category_names(annotation_file: Path) -> tuple[str, ...]:
    """Every category name of an annotation file, in label order (sorted by id), as a split deals them."""
    return _select_categories(load_coco(annotation_file), None, annotation_file)[1]


def _select_categories(coco: COCO, classes: Sequence[str] | None,
                       file: Path) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(category ids, names) in label order: the named classes in the given order, else all sorted by id (their
    names then must be distinct: a task's classes are told apart by name)."""
    categories = sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"])
    ids_by_name: dict[str, list[int]] = {}
    for category in categories:
        ids_by_name.setdefault(category["name"], []).append(category["id"])
    listing = ", ".join(f"{c['id']}: {c['name']}" for c in categories)
    if classes is None:
        repeated = [name for name, ids in ids_by_name.items() if len(ids) > 1]
        if repeated:
            raise DataError(f"{file}: several categories are named {repeated}; the file's categories are {listing}")
        return tuple(c["id"] for c in categories), tuple(c["name"] for c in categories)
    if len(set(classes)) != len(classes) or not classes:
        raise DataError(f"{file}: classes must be distinct names, got {list(classes)}")
    unknown = [name for name in classes if name not in ids_by_name]
    if unknown:
        raise DataError(f"{file}: no category named {unknown}; the file's categories are {listing}")
    ambiguous = [name for name in classes if len(ids_by_name[name]) > 1]
    if ambiguous:
        raise DataError(f"{file}: several categories are named {ambiguous}; the file's categories are {listing}")
    return tuple(ids_by_name[name][0] for name in classes), tuple(classes)
