"""Cosine learning-rate decay over each training experience.

Short budgets end noisily at a constant learning rate; decaying to zero over the experience lets the last
weights settle. It restarts at every experience, because each task gets its own budget, from each parameter group's rate at
the start of the experience (so it composes with plugins that set per-group rates, such as ``layerlr``).
"""
from __future__ import annotations

import math

from avalanche.training.plugins import SupervisedPlugin


class CosineDecay(SupervisedPlugin, supports_distributed=True):
    """Sets every parameter group's lr to ``base * (1 + cos(pi * t / T)) / 2`` at iteration t of T."""

    def __init__(self) -> None:
        super().__init__()
        self._base: list[float] = []
        self._total = 1

    def before_training_exp(self, strategy, **kwargs) -> None:
        groups = strategy.optimizer.param_groups
        self._base = [group["lr"] for group in groups]
        self._total = max(1, strategy.train_epochs * len(strategy.dataloader))
        self._apply(strategy, 0)

    def after_training_iteration(self, strategy, **kwargs) -> None:
        self._apply(strategy, strategy.clock.train_exp_iterations)

    def after_training_exp(self, strategy, **kwargs) -> None:
        for group, base in zip(strategy.optimizer.param_groups, self._base):
            group["lr"] = base  # the next experience (and any plugin reading lr) starts from the configured rate

    def _apply(self, strategy, iteration: int) -> None:
        factor = 0.5 * (1.0 + math.cos(math.pi * min(iteration, self._total) / self._total))
        for group, base in zip(strategy.optimizer.param_groups, self._base):
            group["lr"] = base * factor
