"""What every clmtl model shares: output spaces (heads), an Avalanche multi-task forward that dispatches on the task
label, and heads that grow with the stream.

A model is built from its output spaces (``clmtl.stream.tasks.OutputSpace``); which tasks use which head is the
scenario's business (``clmtl.stream.scenario.output_spaces``). A task label is a head index (``TaskSpec.head``).
``HeadedModel`` keeps the bookkeeping; a subclass says how a head's output is computed (``forward_single_task``,
``forward_all``) and where a head's rows live (``rows``).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from avalanche.models import MultiTaskModule
from torch import nn

from clmtl.models.unified_head import ClassRows
from clmtl.stream.tasks import OutputSpace
from clmtl.training.seeding import generator_for

Output = torch.Tensor | list[torch.Tensor]


class HeadedModel(MultiTaskModule):
    """An Avalanche ``MultiTaskModule`` with one head per output space, in head order (head ``i``: ``spaces[i]``).

    ``forward(x, task_label)`` returns head ``task_label``'s output; ``forward_all(x)`` every head's. Heads grow to the
    classes their experiences bring (``adaptation``), trained rows kept bit for bit.
    """

    anchor_layout = None
    """The detection anchors, for a model with detection heads (``UnifiedModel``)."""

    def __init__(self, spaces: Sequence[OutputSpace]) -> None:
        super().__init__()
        if not spaces:
            raise ValueError("a model needs at least one output space")
        self.spaces = tuple(spaces)
        self.head_seed = torch.initial_seed()
        """Seeds each head's initial rows (``head_generator``) and the rows it grows (``grow``), so they depend on
        neither the global generator's state nor the other heads, nor on the process under torchrun."""

    def head_generator(self, head: int) -> torch.Generator:
        """The generator of head ``head``'s initial rows."""
        return generator_for(self.head_seed, "head", head)

    def rows(self, head: int) -> ClassRows:
        """Head ``head``'s output rows."""
        raise NotImplementedError

    def forward_single_task(self, x: torch.Tensor, task_label: int) -> Output:
        raise NotImplementedError

    def forward_all(self, x: torch.Tensor) -> dict[int, Output]:
        """Every head's output, keyed by head index."""
        raise NotImplementedError

    @property
    def head_kinds(self) -> dict[int, str]:
        """The kind of each head, by head index (task label)."""
        return {head: space.kind for head, space in enumerate(self.spaces)}

    def num_classes(self, head: int) -> int:
        """Classes head ``head`` predicts now."""
        return self.rows(head).num_classes

    def forward(self, x: torch.Tensor, task_labels: int | torch.Tensor | None) -> Output | dict[int, Output]:
        """Dispatch on the task label: an int, a tensor of one repeated label, or None for all heads."""
        if task_labels is None:
            return self.forward_all(x)
        if isinstance(task_labels, torch.Tensor):
            labels = torch.unique(task_labels)
            if labels.numel() != 1:
                raise ValueError(
                    f"a mini-batch must hold a single task; got task labels {labels.tolist()} "
                    "(each task has its own output format, so batches cannot mix tasks)"
                )
            task_labels = int(labels.item())
        if int(task_labels) not in self.head_kinds:
            raise ValueError(f"unknown task label {task_labels}; the model's heads are {self.head_kinds}")
        return self.forward_single_task(x, int(task_labels))

    def forward_all_tasks(self, x: torch.Tensor) -> dict[int, Output]:
        """Avalanche's name for ``forward_all``."""
        return self.forward_all(x)

    def adaptation(self, experience) -> None:
        """Grow the experience's head to the classes it brings (training only), and record its task label.

        Avalanche calls this before every training and evaluation experience; like its ``IncrementalClassifier``
        the head grows to ``max(classes_in_this_experience) + 1`` classes. Evaluation never grows a head: a task
        not trained yet is scored with the classes known so far (in the class scenario its own are not among them).
        """
        labels = set(getattr(experience, "task_labels", ()))
        unknown = sorted(labels - set(self.head_kinds))
        if unknown:
            raise ValueError(f"experience has task labels {unknown}; the model's heads are {sorted(self.head_kinds)}")
        if not self.training:
            return
        self.mark_trained(labels)
        classes = getattr(experience, "classes_in_this_experience", None)
        if classes and len(labels) == 1:
            self.grow(labels.pop(), max(classes) + 1)

    def mark_trained(self, heads: Iterable[int]) -> None:
        """Count ``heads`` as trained from now on (Avalanche's ``known_train_tasks_labels``): by an experience's
        adaptation, by a resumed or continued run for the tasks its checkpoint had trained, by ``joint`` for every
        head at once."""
        self.known_train_tasks_labels = self.known_train_tasks_labels | set(heads)

    def untrained_parameters(self) -> list[nn.Parameter]:
        """The rows of the heads no experience has trained yet. The template drops their gradients before each
        step: a computation shared by several heads (their rows run as one conv) gives them zero gradients, which an
        optimizer with weight decay or momentum would still apply. So a head starts its first task as initialised,
        in one run with every task as in a run that continues a shorter one."""
        return [param for head in range(len(self.spaces)) if head not in self.known_train_tasks_labels
                for param in self.rows(head).parameters()]

    def grow(self, head: int, num_classes: int) -> None:
        """Give ``head`` ``num_classes`` classes (no change if it has as many), trained rows kept bit for bit."""
        rows = self.rows(head)
        if num_classes > rows.num_classes:
            rows.grow(num_classes, generator_for(self.head_seed, "growth", head, rows.num_classes))

    def resize_heads(self, state_dict: Mapping[str, torch.Tensor], prefix: str) -> None:
        """Give every head as many classes as ``state_dict`` has under ``<prefix><head>.weight`` (a checkpoint of a
        grown model loads into the model its config builds, an earlier state into a grown model)."""
        for head in range(len(self.spaces)):
            weight, bias = state_dict.get(f"{prefix}{head}.weight"), state_dict.get(f"{prefix}{head}.bias")
            self.rows(head).resize_like(weight, bias)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by part (``backbone``, ``neck``, ``head``), so each part can get its own learning rate."""
        raise NotImplementedError
