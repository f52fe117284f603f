"""A dataset with its class labels renamed, and classes outside the mapping removed as each task kind requires.

Two uses: picking a task's classes from a dataset (a ``classes:`` subset, or a ``split:``), and placing a task's
labels in the model's head (``clmtl.stream.scenario``: in the class scenario a task's class 0 may be the head's class
7). What happens to a class the mapping leaves out follows the protocols of the literature:

- classification: its samples are dropped;
- segmentation: its pixels become background (label 0), as MiB and PLOP label the classes a step does not cover;
  void (255) stays void;
- detection: its boxes are dropped, as in incremental object detection (iOD, Faster-ILOD), where a task's images
  carry only its own classes' boxes.

``keep_empty=False`` also drops the segmentation and detection images that show none of the kept classes (only
background, or no box left); ``exclude`` drops those that show any of the listed labels (before renaming).
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from clmtl.data.images import draw
from clmtl.data.views import DatasetView
from clmtl.errors import DataError
from clmtl.stream.tasks import CLASSIFICATION, DETECTION, IGNORE_INDEX, SEGMENTATION


class Relabelled(DatasetView):
    """``dataset``'s ``(image, target)`` samples with labels renamed by ``mapping`` (old label -> new label).

    ``subset`` then keeps that many of the remaining samples, drawn with ``seed`` as the real-format loaders draw
    theirs (a seeded permutation, kept in dataset order).
    """

    def __init__(self, dataset: Dataset, kind: str, mapping: Mapping[int, int], keep_empty: bool = True,
                 subset: int | None = None, seed: int = 0, exclude: Collection[int] = ()) -> None:
        self.dataset, self.kind, self.mapping = dataset, kind, dict(mapping)
        self.exclude = set(exclude)
        if kind == SEGMENTATION:
            self._lut = torch.zeros(256, dtype=torch.long)  # every unmapped class becomes background
            self._lut[IGNORE_INDEX] = IGNORE_INDEX
            for old, new in self.mapping.items():
                self._lut[old] = new
        targets = targets_of(dataset)
        self.indices = [i for i, target in enumerate(targets) if self._keeps(target, keep_empty)]
        if not self.indices:
            raise DataError(f"no {kind} sample shows any of the classes picked (labels {sorted(self.mapping)})")
        if subset is not None:
            self.indices = sorted(self.indices[i] for i in draw(len(self.indices), subset, seed))
        self._targets = [targets[i] for i in self.indices]

    def _keeps(self, target: Any, keep_empty: bool) -> bool:
        if self.kind == CLASSIFICATION:
            return int(target) in self.mapping
        if keep_empty and not self.exclude:
            return True
        present = set((torch.as_tensor(target) if self.kind == SEGMENTATION else target["labels"]).unique().tolist())
        if present & self.exclude:
            return False
        if keep_empty:
            return True
        if self.kind == SEGMENTATION:
            return any(label in self.mapping and self.mapping[label] != 0 for label in present)
        return any(label in self.mapping for label in present)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, Any]:
        image, target = self.dataset[self.indices[i]]
        return image, self.relabel(target)

    def target(self, i: int) -> Any:
        """Target ``i`` as served, without touching the image."""
        return self.relabel(self._targets[i])

    def relabel(self, target: Any) -> Any:
        """One target with the mapping applied (what ``__getitem__`` serves)."""
        if self.kind == CLASSIFICATION:
            return self.mapping[int(target)]
        if self.kind == SEGMENTATION:
            return self._lut[target.long()]
        assert self.kind == DETECTION
        relabelled = _boxes(target, self.mapping)
        if "original" in target:  # the annotation file's own boxes, kept for scoring (clmtl.data.coco)
            relabelled["original"] = _boxes(target["original"], self.mapping)
        return relabelled

    def source_index(self, i: int) -> int:
        return self.indices[i]

    def original_target(self, i: int) -> Any:
        """Target ``i`` at its file's resolution, relabelled."""
        return self.relabel(super().original_target(i))


PER_BOX = ("boxes", "labels", "iscrowd")
"""The entries of a detection target with one row per box."""


def _boxes(target: dict, mapping: Mapping[int, int]) -> dict:
    """A detection target (or its ``original`` view) keeping the mapped classes' boxes, relabelled."""
    labels = target["labels"]
    keep = torch.tensor([int(label) in mapping for label in labels], dtype=torch.bool)
    kept = {key: value[keep] if key in PER_BOX else value for key, value in target.items()}
    kept["labels"] = torch.tensor([mapping[int(label)] for label in labels[keep]], dtype=torch.long)
    return kept


def targets_of(dataset: Dataset) -> list[Any]:
    """Every target, without decoding images where the dataset keeps them apart (``targets``, ``target(i)``)."""
    if hasattr(dataset, "target"):
        return [dataset.target(i) for i in range(len(dataset))]
    if hasattr(dataset, "targets"):
        return list(dataset.targets)
    return [dataset[i][1] for i in range(len(dataset))]
