"""A user's own ``torch.nn.Module`` as a clmtl model (``clmtl.run(config, model=module)``).

Two kinds of module are taken, for classification streams:

- a plain classifier, ``module(x) -> [B, C]`` logits with ``C`` at least the stream's classes: the one head of the
  class or domain scenario. Its outputs are the head's classes in label order, and only those of the classes seen
  so far take part (van de Ven & Tolias's "active units"), so it grows as a clmtl head grows;
- an Avalanche ``MultiTaskModule`` (``module(x, task_label)``, e.g. with a ``MultiHeadClassifier``): a head per task,
  for the task scenario. Its heads are its own, grown by Avalanche's adaptation when a task first trains.

Either way the strategies see the wrapper, which offers what every clmtl model offers (``HeadedModel``); the
module's parameters are the wrapper's, under ``module.``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from avalanche.models import MultiTaskModule
from torch import nn

from clmtl.models.heads import HeadedModel
from clmtl.stream.tasks import CLASSIFICATION, OutputSpace


class UserModelError(ValueError):
    """A module that cannot serve the stream; the message is one line."""


class SingleHeadModule(HeadedModel):
    """A plain classifier as the one head of the class or domain scenario, its outputs active up to the classes seen."""

    def __init__(self, spaces: Sequence[OutputSpace], module: nn.Module) -> None:
        super().__init__(spaces)
        _classification_only(self.spaces)
        if len(self.spaces) != 1:
            raise UserModelError(f"a single-head module ({type(module).__name__}) serves one output space (scenario "
                                 f"class or domain); this stream has {len(self.spaces)} heads: give an Avalanche "
                                 "MultiTaskModule for the task scenario")
        self.module = module
        self.backbone_name = type(module).__name__
        self.register_buffer("active", torch.tensor(self.spaces[0].initial))
        """How many of the module's outputs take part: the classes seen so far."""

    def num_classes(self, head: int) -> int:
        return int(self.active)

    def grow(self, head: int, num_classes: int) -> None:
        self.active.fill_(max(int(self.active), num_classes))

    def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
        logits = self.module(x)
        needed = len(self.spaces[0].classes)
        if logits.dim() != 2 or logits.shape[1] < needed:
            raise UserModelError(f"{self.backbone_name} returned logits of shape {tuple(logits.shape)}; the stream "
                                 f"needs [batch, >= {needed}] (one output per class)")
        return logits[:, : int(self.active)]

    def forward_all(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        return {0: self.forward_single_task(x, 0)}

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"backbone": list(self.module.parameters())}


class MultiTaskUserModule(HeadedModel):
    """An Avalanche ``MultiTaskModule`` with its own heads, one per task label (the task scenario)."""

    def __init__(self, spaces: Sequence[OutputSpace], module: MultiTaskModule) -> None:
        super().__init__(spaces)
        _classification_only(self.spaces)
        self.module = module
        self.backbone_name = type(module).__name__

    def num_classes(self, head: int) -> int:
        raise UserModelError(f"{self.backbone_name}'s heads are its own: clmtl cannot tell or change their size")

    def grow(self, head: int, num_classes: int) -> None:
        """Nothing: Avalanche's adaptation grows the module's own heads (it visits the module after this wrapper)."""

    def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
        return self.module(x, task_label)

    def forward_all(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        return {head: self.module(x, head) for head in self.head_kinds if head in self.module.known_train_tasks_labels}

    def untrained_parameters(self) -> list[nn.Parameter]:
        """None: Avalanche's multi-head classifier makes a task's head when the task's first experience comes."""
        return []

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"backbone": list(self.module.parameters())}


def user_model(module: nn.Module, spaces: Sequence[OutputSpace]) -> HeadedModel:
    """``module`` as a clmtl model with the output spaces ``spaces``: a clmtl model as it is, an Avalanche
    ``MultiTaskModule`` with its heads, any other module as a single-head classifier."""
    if isinstance(module, HeadedModel):
        return module
    if isinstance(module, MultiTaskModule):
        return MultiTaskUserModule(spaces, module)
    return SingleHeadModule(spaces, module)


def _classification_only(spaces: Sequence[OutputSpace]) -> None:
    other = next((space for space in spaces if space.kind != CLASSIFICATION), None)
    if other is not None:
        raise UserModelError(f"a module of your own serves classification tasks; head {other.name!r} is {other.kind}")
