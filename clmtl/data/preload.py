"""A training loader over an experience held in memory as tensors, for streams whose training samples never change.

Avalanche's loaders fetch every sample through its dataset tree (about 20 µs each, several ms per batch of 128), which
on a small model such as the papers' MLP costs as much as the training step itself. Where a training sample is the
same every time it is read (classification images with no random augmentation), the experience is read once into
tensors and every batch is one indexing operation. The order of each epoch is a fresh permutation from torch's
generator, as a shuffling ``DataLoader`` draws it, so a seed gives the same run, and resuming redraws the same order.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

PRELOAD_LIMIT_BYTES = 2 * 1024**3
"""Largest experience read into memory (its images as float32); a larger one keeps Avalanche's loader."""
_READ_BATCH = 1024


class PreloadedLoader:
    """Shuffled mini-batches ``[images, targets, task labels]`` of a dataset of ``(image, class, task)`` samples,
    read once."""

    def __init__(self, dataset: Dataset, batch_size: int, collate_fn=None) -> None:
        reader = DataLoader(dataset, batch_size=_READ_BATCH, shuffle=False, collate_fn=collate_fn)
        self.columns = [torch.cat(column) for column in zip(*reader)]
        self.batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.columns[0]) / self.batch_size)

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        order = torch.randperm(len(self.columns[0]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            yield [column[batch] for column in self.columns]


def fits_in_memory(dataset: Dataset) -> bool:
    """Whether ``dataset``'s images, as float32, stay under ``PRELOAD_LIMIT_BYTES`` (estimated from its first)."""
    if len(dataset) == 0:
        return False
    image = dataset[0][0]
    return isinstance(image, torch.Tensor) and image.numel() * 4 * len(dataset) <= PRELOAD_LIMIT_BYTES
