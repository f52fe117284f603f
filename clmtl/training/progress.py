"""One compact tqdm bar per training experience (Avalanche's InteractiveLogger prints one per epoch)."""
from __future__ import annotations

from avalanche.training.plugins import SupervisedPlugin
from tqdm.auto import tqdm


class ProgressBar(SupervisedPlugin, supports_distributed=True):
    """Shows iterations of the whole experience and a running loss."""

    def __init__(self, label: str = "", disable: bool | None = None) -> None:
        super().__init__()
        self.label = label
        self.disable = disable
        self._bar: tqdm | None = None

    def before_training_exp(self, strategy, **kwargs) -> None:
        total = strategy.planned_iterations
        task = strategy.experience.task_label
        self._bar = tqdm(total=total, desc=f"{self.label}task {task}", unit="it", leave=False, disable=self.disable)

    def after_training_iteration(self, strategy, **kwargs) -> None:
        self._bar.update(strategy.clock.train_exp_iterations - self._bar.n)  # a resumed experience jumps ahead
        if strategy.clock.train_exp_iterations % 10 == 0:
            self._bar.set_postfix(loss=f"{strategy.loss.item():.3f}", epoch=strategy.clock.train_exp_epochs)

    def after_training_exp(self, strategy, **kwargs) -> None:
        self._bar.close()
        self._bar = None
