"""One Avalanche benchmark from heterogeneous task datasets.

Each task becomes one experience of the train and test streams, labelled with its position in the
stream (the task label) and carrying its own collate function, so a segmentation batch stacks label
maps while a detection batch keeps a list of box dictionaries. Avalanche keeps a dataset's own
collate only for task-aware experiences (see AVALANCHE_NOTES.md §1), hence ``with_task_labels``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset
from torch.utils.data.dataloader import default_collate

from clmtl.tasks import DETECTION, TaskSpec


def detection_collate(batch: Sequence[Sequence[Any]]) -> list[Any]:
    """Stack images and task labels; keep the per-image box dictionaries as a list."""
    images = torch.stack([sample[0] for sample in batch])
    targets = [sample[1] for sample in batch]
    task_labels = torch.as_tensor([sample[-1] for sample in batch])
    return [images, targets, task_labels]


def collate_for(kind: str) -> Callable[[Sequence[Any]], Any]:
    """The collate function that batches samples of one task kind."""
    return detection_collate if kind == DETECTION else default_collate


def task_dataset(dataset: Dataset, task: TaskSpec, task_label: int):
    """Wrap a ``(image, target)`` dataset as an AvalancheDataset yielding ``[image, target, task_label]``."""
    from avalanche.benchmarks.utils import AvalancheDataset
    from avalanche.benchmarks.utils.data_attribute import TaskLabels
    from avalanche.benchmarks.utils.flat_data import ConstantSequence

    if len(dataset) == 0:
        raise ValueError(f"task {task.name!r}: the dataset is empty")
    return AvalancheDataset(
        [dataset],
        data_attributes=[TaskLabels(ConstantSequence(task_label, len(dataset)))],
        collate_fn=collate_for(task.kind),
    )


def build_stream(tasks: Sequence[TaskSpec], train_sets: Sequence[Dataset], test_sets: Sequence[Dataset]):
    """The benchmark: experience ``i`` of both streams is task ``tasks[i]`` with task label ``i``."""
    from avalanche.benchmarks.scenarios import benchmark_from_datasets, with_task_labels

    if not len(tasks) == len(train_sets) == len(test_sets):
        raise ValueError("build_stream needs one train and one test dataset per task")
    train = [task_dataset(ds, task, label) for label, (task, ds) in enumerate(zip(tasks, train_sets))]
    test = [task_dataset(ds, task, label) for label, (task, ds) in enumerate(zip(tasks, test_sets))]
    return with_task_labels(benchmark_from_datasets(train=train, test=test))
