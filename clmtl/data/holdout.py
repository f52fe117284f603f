"""A validation split carved from a task's training data, for selecting hyperparameters without the evaluation set.

``data.holdout: F`` (``clmtl.studies.tune`` sets it) moves a fraction ``F`` of each task's training samples into the set
the run evaluates on, in place of the task's validation data, and trains on the rest. Which samples move is a
permutation drawn from the run's seed and the task's position in the stream, so the same config always carves the
same samples.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch.utils.data import Dataset

from clmtl.data.images import draw
from clmtl.data.relabel import targets_of
from clmtl.data.views import DatasetView
from clmtl.errors import DataError


class Part(DatasetView):
    """The samples ``indices`` of ``dataset``, which still answer ``target(i)`` and ``meta(i)`` without decoding."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)
        self._targets = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[self.indices[i]]

    def target(self, i: int) -> Any:
        if self._targets is None:
            self._targets = targets_of(self.dataset)
        return self._targets[self.indices[i]]

    def source_index(self, i: int) -> int:
        return self.indices[i]


def carve(dataset: Dataset, fraction: float, seed: int, task_index: int) -> tuple[Part, Part]:
    """``dataset`` split into (training part, held-out part) with ``round(fraction * len)`` samples held out."""
    held = round(fraction * len(dataset))
    if not 1 <= held < len(dataset):
        raise DataError(f"data.holdout={fraction} holds out {held} of the task's {len(dataset)} training samples; "
                        "it must leave at least one on each side")
    order = draw(len(dataset), len(dataset), seed * 1000 + task_index)
    return Part(dataset, sorted(order[held:])), Part(dataset, sorted(order[:held]))
