"""One Avalanche benchmark from heterogeneous task datasets.

Each task becomes one experience of the train and test streams. Its task label is the model head it uses
(``TaskSpec.head``: the task's own in the task scenario, its kind's shared one in the class and domain scenarios),
and it carries its own collate function, so a segmentation batch stacks label maps while a detection batch keeps a
list of box dictionaries. Avalanche keeps a dataset's own collate only for experiences with task labels (its
``SupervisedTemplate`` builds a plain loader otherwise), hence ``with_task_labels``. Every experience also carries
Avalanche's class timeline (``classes_in_this_experience``, ``classes_seen_so_far``...), in the labels of its head,
which heads read to grow (``UnifiedModel.adaptation``) as Avalanche's ``IncrementalClassifier`` does. A classification
experience's dataset also has Avalanche's ``targets`` attribute (each sample's class, in head labels), which
Avalanche's class-balanced buffers read (``avalanche.GDumb``).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from avalanche.benchmarks.scenarios import CLScenario, benchmark_from_datasets, with_task_labels
from avalanche.benchmarks.scenarios.generic_scenario import EagerCLStream
from avalanche.benchmarks.utils import AvalancheDataset, DataAttribute
from avalanche.benchmarks.utils.data_attribute import TaskLabels
from avalanche.benchmarks.utils.flat_data import ConstantSequence
from torch.utils.data import Dataset
from torch.utils.data.dataloader import default_collate

from clmtl.data.relabel import targets_of
from clmtl.data.transforms import JointTransform
from clmtl.stream.scenario import placed
from clmtl.stream.tasks import CLASSIFICATION, DETECTION, TaskSpec


def detection_collate(batch: Sequence[Sequence[Any]]) -> list[Any]:
    """Stack images and task labels; keep the per-image box dictionaries as a list."""
    images = torch.stack([sample[0] for sample in batch])
    targets = [sample[1] for sample in batch]
    task_labels = torch.as_tensor([sample[-1] for sample in batch])
    return [images, targets, task_labels]


def collate_for(kind: str) -> Callable[[Sequence[Any]], Any]:
    """The collate function that batches samples of one task kind."""
    return detection_collate if kind == DETECTION else default_collate


def class_labels(dataset: Dataset) -> list[int]:
    """Each sample's class of a classification dataset, through the training augmentation (``JointTransform``, which
    leaves class ids untouched), without loading images where the dataset keeps its targets apart."""
    while isinstance(dataset, JointTransform):
        dataset = dataset.dataset
    return [int(target) for target in targets_of(dataset)]


def task_dataset(dataset: Dataset, task: TaskSpec, task_label: int):
    """Wrap a ``(image, target)`` dataset as an AvalancheDataset yielding ``[image, target, task_label]``; a
    classification dataset also gets the ``targets`` attribute (``class_labels``)."""
    if len(dataset) == 0:
        raise ValueError(f"task {task.name!r}: the dataset is empty")
    attributes = [TaskLabels(ConstantSequence(task_label, len(dataset)))]
    if task.kind == CLASSIFICATION:
        attributes.append(DataAttribute(class_labels(dataset), "targets"))
    return AvalancheDataset([dataset], data_attributes=attributes, collate_fn=collate_for(task.kind))


def build_stream(tasks: Sequence[TaskSpec], train_sets: Sequence[Dataset], test_sets: Sequence[Dataset]):
    """The benchmark: experience ``i`` of both streams is task ``tasks[i]``, with task label ``tasks[i].head``."""
    if not len(tasks) == len(train_sets) == len(test_sets):
        raise ValueError("build_stream needs one train and one test dataset per task")
    tasks = placed(tasks)
    train = [task_dataset(ds, task, task.head) for task, ds in zip(tasks, train_sets)]
    test = [task_dataset(ds, task, task.head) for task, ds in zip(tasks, test_sets)]
    return with_class_timeline(with_task_labels(benchmark_from_datasets(train=train, test=test)), tasks)


def with_class_timeline(benchmark, tasks: Sequence[TaskSpec]):
    """``benchmark`` with Avalanche's class-timeline attributes on every experience, in head labels.

    Avalanche's ``with_classes_timeline`` reads each dataset's ``targets``, which segmentation and detection samples
    do not have as single ints; the tasks already know their classes. Classes of other heads (other kinds, or other
    tasks in the task scenario) are other label spaces, so the timeline of an experience counts its head's only.
    """
    streams = []
    for stream in benchmark.streams.values():
        experiences = []
        for index, experience in enumerate(stream):
            same_head = [set(t.labels) for t in tasks if t.head == tasks[index].head]
            before = [set(t.labels) for t in tasks[:index] if t.head == tasks[index].head]
            experience = copy.copy(experience)
            experience.classes_in_this_experience = sorted(set(tasks[index].labels))
            experience.previous_classes = sorted(set().union(*before))
            experience.classes_seen_so_far = sorted(set().union(*before, tasks[index].labels))
            experience.future_classes = sorted(set().union(*same_head) - set(experience.classes_seen_so_far))
            experiences.append(experience)
        streams.append(EagerCLStream(stream.name, experiences))
    return CLScenario(streams)
