"""A user's own Avalanche benchmark of classification experiences, as a clmtl stream.

``SplitMNIST(n_experiences=5, return_task_id=False, dataset_root=...)``, ``nc_benchmark(...)`` on one's own datasets,
or any benchmark with ``train_stream`` / ``test_stream`` of classification experiences whose samples are
``(image, class, task label)``: experience ``i`` of both streams becomes task ``cls<i+1>`` of the stream, with the
classes Avalanche says it holds (``classes_in_this_experience``, else its dataset's ``targets``).

The scenario follows the benchmark's task labels, as Avalanche means them: one distinct label per experience is the
task scenario (one head per task: a multi-head model, each task's classes relabelled 0, 1, ... in its head), the same
label throughout is the class scenario (one head whose classes grow). ``scenario="domain"`` shares one head by class
position instead (class ``i`` of every experience is output ``i``, van de Ven's domain-incremental Split MNIST).

Images keep the benchmark's own transforms (its augmentation and normalisation, none of clmtl's is added) and are
then made what the model takes: 3 channels (grey repeated) of ``data.image_size`` pixels (resized bilinear with
antialias), float.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as F

from clmtl.config import Config
from clmtl.data.relabel import Relabelled
from clmtl.errors import ConfigError
from clmtl.stream.benchmark import Benchmark, in_head_labels
from clmtl.stream.experiences import build_stream
from clmtl.stream.scenario import plan_stream
from clmtl.stream.tasks import CLASSIFICATION, TaskSpec, short_kind


class ModelImages(Dataset):
    """An Avalanche classification dataset's ``(image, class)`` with images as the model takes them."""

    def __init__(self, dataset: Any, image_size: int) -> None:
        self.dataset, self.image_size = dataset, image_size
        self.targets = [int(target) for target in dataset.targets]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        sample = self.dataset[i]
        return model_image(sample[0], self.image_size), int(sample[1])

    def target(self, i: int) -> int:
        return self.targets[i]


def model_image(image: Any, size: int) -> Tensor:
    """A PIL image or an image tensor (uint8 or float, 1 or 3 channels) as a float ``[3, size, size]`` tensor."""
    image = F.to_dtype(F.to_image(image), torch.float32, scale=True)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    if tuple(image.shape[-2:]) != (size, size):
        image = F.resize(image, [size, size], antialias=True)
    return image.contiguous()


def from_avalanche(benchmark: Any, config: Config, scenario: str | None = None,
                   class_names: Sequence[str] | Mapping[int, str] | None = None,
                   name: str = "avalanche") -> Benchmark:
    """``benchmark`` (an Avalanche benchmark of classification experiences) as the stream clmtl trains on.

    ``config`` gives the image size and each experience's epochs (``train.epochs.cls``); ``scenario`` overrides the
    one read from the task labels (see the module docstring); ``class_names[c]`` names class ``c`` (default: the
    number); ``name`` is what results.json calls the benchmark.
    """
    train_stream, test_stream = list(benchmark.train_stream), list(benchmark.test_stream)
    if not train_stream or len(train_stream) != len(test_stream):
        raise ConfigError(f"Avalanche benchmark: needs one test experience per train experience, got "
                          f"{len(train_stream)} train and {len(test_stream)} test experiences")
    scenario = scenario or scenario_of(train_stream)
    tasks, train, val = [], [], []
    for index, (train_experience, test_experience) in enumerate(zip(train_stream, test_stream)):
        classes = experience_classes(train_experience)
        own_labels = {label: position for position, label in enumerate(classes)}
        names = [str(class_names[c]) if class_names is not None else str(c) for c in classes]
        tasks.append(TaskSpec(f"cls{index + 1}", CLASSIFICATION, tuple(names)))
        train.append(Relabelled(ModelImages(train_experience.dataset, config.data.image_size), CLASSIFICATION,
                                own_labels))
        val.append(Relabelled(ModelImages(test_experience.dataset, config.data.image_size), CLASSIFICATION,
                              own_labels))
    tasks = plan_stream(tasks, scenario, positional=scenario == "domain")
    train = [in_head_labels(dataset, task) for dataset, task in zip(train, tasks)]
    val = [in_head_labels(dataset, task) for dataset, task in zip(val, tasks)]
    epochs = [config.train.epochs[short_kind(CLASSIFICATION)]] * len(tasks)
    return Benchmark(tasks, build_stream(tasks, train, val), val, epochs, name, scenario)


def scenario_of(experiences: Sequence[Any]) -> str:
    """``task`` when every experience has a task label of its own, ``class`` when they all share one."""
    labels = [experience_task_label(experience) for experience in experiences]
    if len(set(labels)) == 1:
        return "class"
    if len(set(labels)) == len(labels):
        return "task"
    raise ConfigError(f"Avalanche benchmark: task labels {labels} repeat across experiences without being all the "
                      "same; clmtl's heads follow the task labels: give each experience its own, or one for all")


def experience_task_label(experience: Any) -> int:
    labels = list(experience.task_labels)
    if len(labels) != 1:
        raise ConfigError(f"Avalanche benchmark: experience {experience.current_experience} mixes task labels "
                          f"{labels}; each experience must have one")
    return int(labels[0])


def experience_classes(experience: Any) -> list[int]:
    """The classes an experience holds, in label order: Avalanche's class timeline, else its dataset's targets."""
    classes = getattr(experience, "classes_in_this_experience", None)
    if classes is None:
        classes = set(int(target) for target in experience.dataset.targets)
    return sorted(int(c) for c in classes)
