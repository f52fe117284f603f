"""MultiTaskTemplate: Avalanche's SupervisedTemplate on a stream whose tasks have different target kinds.

Only two things in the stock template assume class-int targets: the minibatch is moved to the device
with ``.to`` on every element (a detection batch holds a list of dicts), and the loss is a single
``CrossEntropyLoss``. The loss routing lives in the criterion (``clmtl.losses.MultiTaskLoss``), so
plugins that call ``strategy._criterion`` directly (EWC's Fisher) route the same way; this class only
moves nested batches. Everything else — callbacks, plugins, evaluator, loggers — is Avalanche's.
"""
from __future__ import annotations

from typing import Any

import torch
from avalanche.training.templates import SupervisedTemplate


def to_device(value: Any, device: torch.device | str) -> Any:
    """Move tensors nested in lists, tuples and dicts to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(item, device) for item in value)
    return value


def task_batch_loss(strategy, batch: list, task_label: int) -> torch.Tensor:
    """Loss of a collated ``[images, targets, ...]`` batch of one task, through that task's head and loss.

    For plugins that add other tasks' samples to a step (replay, joint): each task keeps its own output format,
    so its samples cannot join the current mini-batch and get their own forward pass instead.
    """
    images, targets = to_device(batch[0], strategy.device), to_device(batch[1], strategy.device)
    return strategy._criterion(strategy.model(images, task_label), targets)


class MultiTaskTemplate(SupervisedTemplate):
    """SupervisedTemplate whose minibatches may hold targets of any kind (label maps, box lists, class ids)."""

    def _unpack_minibatch(self) -> None:
        self.mbatch = [to_device(item, self.device) for item in self.mbatch]
