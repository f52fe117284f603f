"""Per-experience learning-rate schedule: optional linear warmup, then constant or cosine decay.

Each experience resets the optimizer state, and Adam's first bias-corrected steps move every weight by about the
full learning rate whatever its gradient's scale: a linear warmup over the first iterations tempers those steps
(ultralytics' trainer also warms up, for 3 epochs by default). Short budgets end noisily at a constant rate; cosine
decay to zero lets the last weights settle. The schedule restarts at every experience, because each task gets its
own budget, from each parameter group's rate at the start of the experience (so it composes with plugins that set
per-group rates, such as ``layerlr``).
"""
from __future__ import annotations

import math

from avalanche.training.plugins import SupervisedPlugin


class LRSchedule(SupervisedPlugin, supports_distributed=True):
    """Sets every parameter group's lr to ``base * warmup(t) * decay(t)`` for the step at iteration t of T.

    ``warmup(t) = min(1, (t + 1) / W)`` with W = ``warmup_epochs`` epochs of iterations, or 1 without warmup;
    ``decay(t) = (1 + cos(pi * t / T)) / 2`` when ``cosine``, else 1.
    """

    def __init__(self, cosine: bool = False, warmup_epochs: float = 0.0) -> None:
        super().__init__()
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        self.cosine = cosine
        self.warmup_epochs = warmup_epochs
        self._base: list[float] = []
        self._total = 1
        self._warmup = 0.0

    def before_training_exp(self, strategy, **kwargs) -> None:
        groups = strategy.optimizer.param_groups
        self._base = [group["lr"] for group in groups]
        self._total = max(1, strategy.planned_iterations)
        self._warmup = self.warmup_epochs * len(strategy.dataloader)
        self._apply(strategy, 0)

    def after_training_iteration(self, strategy, **kwargs) -> None:
        # Avalanche's clock is the last plugin: here it still counts the iteration just finished, not the next one
        self._apply(strategy, strategy.clock.train_exp_iterations + 1)

    def after_training_exp(self, strategy, **kwargs) -> None:
        for group, base in zip(strategy.optimizer.param_groups, self._base):
            group["lr"] = base  # the next experience (and any plugin reading lr) starts from the configured rate

    def factor(self, iteration: int) -> float:
        """The multiplier of the base rate for the step taken at ``iteration`` (0-based) of the experience."""
        warmup = min(1.0, (iteration + 1) / self._warmup) if self._warmup > 0 else 1.0
        if not self.cosine:
            return warmup
        return warmup * 0.5 * (1.0 + math.cos(math.pi * min(iteration, self._total) / self._total))

    def _apply(self, strategy, iteration: int) -> None:
        factor = self.factor(iteration)
        for group, base in zip(strategy.optimizer.param_groups, self._base):
            group["lr"] = base * factor
