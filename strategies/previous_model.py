"""What the class-incremental methods that learn from the previous experience's model share (MiB, PLOP,
pseudo-labels, detection distillation): that model, frozen, and the class scenario they act in, where one head per
kind grows and ``old`` is the number of classes it had before the experience."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from clmtl.errors import ConfigError
from clmtl.training.plugin import Plugin, copy_bytes, frozen_copy


class PreviousModelPlugin(Plugin, supports_distributed=True):
    """Keeps a frozen copy of the model as each experience leaves it; refuses a stream outside the class scenario."""

    model_copies = ("teacher",)
    """The previous experience's model."""
    method: ClassVar[str] = ""
    """The strategy's registered name, for its messages."""

    def __init__(self) -> None:
        super().__init__()
        self.teacher: nn.Module | None = None

    @property
    def memory_bytes(self) -> int:
        return copy_bytes(self.teacher)

    def bind_benchmark(self, benchmark) -> None:
        if benchmark.scenario != "class":
            raise ConfigError(f"{self.method} acts in the class scenario, where one head per kind grows with the "
                              f"stream; this stream is in the {benchmark.scenario} scenario")

    def old_classes(self, strategy) -> int:
        """Classes the head being trained had before this experience (0: no previous model)."""
        return 0 if self.teacher is None else self.teacher.num_classes(strategy.experience.task_label)

    @torch.no_grad()
    def previous_output(self, strategy):
        """The previous model's output for the mini-batch's images."""
        return self.teacher(strategy.mb_x, strategy.experience.task_label)

    def after_training_exp(self, strategy, **kwargs) -> None:
        self.teacher = frozen_copy(strategy.model)
