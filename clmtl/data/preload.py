"""Loaders over experiences held in memory as tensors, for streams whose samples never change.

Avalanche's loaders fetch every sample through its dataset tree (about 20 µs each, several ms per batch of 128), which
on a small model such as the papers' MLP costs as much as the training step itself. Where a sample is the same every
time it is read (classification images with no random augmentation), an experience is read once into tensors and
every batch is one indexing operation. The order of each training epoch is a fresh permutation from torch's
generator, as a shuffling ``DataLoader`` draws it, so a seed gives the same run, and resuming redraws the same order.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

PRELOAD_LIMIT_BYTES = 2 * 1024**3
"""Most bytes of images (as float32) held in memory: per training experience, and for all test sets together."""
_READ_BATCH = 1024


class PreloadedLoader:
    """Mini-batches ``[images, targets, task labels]`` of a dataset of ``(image, class, task)`` samples, read once;
    shuffled (training) or in the dataset's order (evaluation)."""

    def __init__(self, dataset: Dataset, batch_size: int, collate_fn=None, shuffle: bool = True) -> None:
        reader = DataLoader(dataset, batch_size=_READ_BATCH, shuffle=False, collate_fn=collate_fn)
        self.columns = [torch.cat(column) for column in zip(*reader)]
        self.batch_size, self.shuffle = batch_size, shuffle

    def __len__(self) -> int:
        return math.ceil(len(self.columns[0]) / self.batch_size)

    @property
    def nbytes(self) -> int:
        return sum(column.numel() * column.element_size() for column in self.columns)

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        count = len(self.columns[0])
        order = torch.randperm(count) if self.shuffle else torch.arange(count)
        for start in range(0, count, self.batch_size):
            batch = order[start:start + self.batch_size]
            yield [column[batch] for column in self.columns]


def image_bytes(dataset: Dataset) -> int | None:
    """Bytes of ``dataset``'s images as float32, estimated from its first (None: not tensor images, or empty)."""
    if len(dataset) == 0:
        return None
    image = dataset[0][0]
    return image.numel() * 4 * len(dataset) if isinstance(image, torch.Tensor) else None
