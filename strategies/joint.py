"""Joint training, the upper bound of every table: each step learns every task of the benchmark.

Batches cannot mix tasks (each has its own output format), so every training step adds one mini-batch of
each other task — past and future ones — through its own head and loss, with equal weight, to the current
task's loss. Training therefore sees every task from the first experience on, over the whole stream's budget,
at about T times a naive step. Every head is grown to all its classes before training starts (in the class scenario
a head would otherwise hold only the classes seen so far). It needs the stream, which ``clmtl run`` hands over through
``bind_benchmark``.
"""
from __future__ import annotations

from collections.abc import Iterator

from avalanche.training.plugins import SupervisedPlugin
from torch.utils.data import DataLoader

from clmtl.registry import register
from clmtl.scenario import placed
from clmtl.template import task_batch_loss


def endless_batches(dataset, batch_size: int) -> Iterator[list]:
    """Shuffled mini-batches of ``dataset`` (with its own collate), epoch after epoch."""
    while True:
        yield from DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=dataset.collate_fn)


class JointTraining(SupervisedPlugin, supports_distributed=True):
    """Adds a mini-batch loss of every other task of the stream to each training step."""

    def __init__(self) -> None:
        super().__init__()
        self.tasks: list = []
        self.datasets: dict[int, object] = {}
        self._batches: dict[int, Iterator[list]] = {}

    def bind_benchmark(self, benchmark) -> None:
        """Take every task's training data, by experience (called by ``clmtl run`` before training)."""
        self.tasks = placed(benchmark.tasks)
        self.datasets = {exp.current_experience: exp.dataset for exp in benchmark.stream.train_stream}

    def before_training(self, strategy, **kwargs) -> None:
        """Every head with all its classes, before the template hands the parameters to the optimizer."""
        for task in self.tasks:
            strategy.model.grow(task.head, max(task.labels) + 1)

    def state_dict(self) -> dict:
        """Nothing carries over from one experience to the next (see clmtl.checkpoint)."""
        return {}

    def load_state_dict(self, state: dict, model) -> None:
        pass

    def before_training_exp(self, strategy, **kwargs) -> None:
        if not self.datasets:
            raise RuntimeError("joint needs the stream: call bind_benchmark(benchmark) before training")
        current = strategy.experience.current_experience
        self._batches = {index: endless_batches(data, strategy.train_mb_size)
                         for index, data in self.datasets.items() if index != current}

    def before_backward(self, strategy, **kwargs) -> None:
        for index, batches in self._batches.items():
            strategy.loss += task_batch_loss(strategy, next(batches), self.tasks[index].head)


@register("joint", acts_on=("data", "loss"))
def joint(params: dict) -> JointTraining:
    """Upper bound: every step also learns every other task of the stream."""
    return JointTraining()
