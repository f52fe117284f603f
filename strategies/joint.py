"""Joint training, the upper bound of every table: each step learns every task of the benchmark.

Every training step adds one mini-batch of each other task — past and future ones. A batch of another head cannot join
the mini-batch (each head has its own output format) and adds its own loss, through its head, with equal weight; a
batch of the head being trained (the class and domain scenarios' shared head) joins the mini-batch, so BatchNorm
normalises all of that head's tasks together, as at evaluation. Training therefore sees every task from the first
experience on, over the whole stream's budget, at about T times a naive step. Every head is grown to all its classes
before training starts (in the class scenario a head would otherwise hold only the classes seen so far). It needs the
stream, which ``clmtl run`` hands over through ``bind_benchmark``.
"""
from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import DataLoader

from clmtl.errors import ConfigError
from clmtl.stream.scenario import placed
from clmtl.training.plugin import Plugin, joined, task_batch_loss, to_device
from clmtl.training.registry import register


def endless_batches(dataset, batch_size: int) -> Iterator[list]:
    """Shuffled mini-batches of ``dataset`` (with its own collate), epoch after epoch."""
    while True:
        yield from DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=dataset.collate_fn)


class JointTraining(Plugin, supports_distributed=True):
    """Upper bound: every step also learns every other task of the stream.

    Adds a mini-batch loss of every other task of the stream to each training step."""

    transient = ("datasets", "_batches", "_pending")
    """The stream's data (``bind_benchmark`` hands it over again in a resumed run) and the batches drawn from it."""

    def __init__(self) -> None:
        super().__init__()
        self.tasks: list = []
        self.datasets: dict[int, object] = {}
        self._batches: dict[int, Iterator[list]] = {}
        self._pending: list[tuple[list, int]] = []

    def bind_benchmark(self, benchmark) -> None:
        """Take every task's training data, by experience (called by ``clmtl run`` before training)."""
        if benchmark.inherited:
            raise ConfigError("joint trains on every task's training data at once; a continued run has none for the "
                              f"{benchmark.inherited} task(s) it inherits")
        self.tasks = placed(benchmark.tasks)
        self.datasets = {exp.current_experience: exp.dataset for exp in benchmark.stream.train_stream}

    def before_training(self, strategy, **kwargs) -> None:
        """Every head with all its classes, before the template hands the parameters to the optimizer, and trained
        from the first experience on."""
        for task in self.tasks:
            strategy.model.grow(task.head, max(task.labels) + 1)
        strategy.model.mark_trained(task.head for task in self.tasks)

    def before_training_exp(self, strategy, **kwargs) -> None:
        if not self.datasets:
            raise RuntimeError("joint needs the stream: call bind_benchmark(benchmark) before training")
        current = strategy.experience.current_experience
        self._batches = {index: endless_batches(data, strategy.train_mb_size)
                         for index, data in self.datasets.items() if index != current}

    def before_forward(self, strategy, **kwargs) -> None:
        """Every other task's next batch: joined to the mini-batch when it uses the head being trained (one forward
        pass, BatchNorm over both), else waiting for ``before_backward``."""
        self._pending = []
        head = strategy.experience.task_label
        for index, batches in self._batches.items():
            batch = next(batches)
            if self.tasks[index].head == head:
                strategy.mbatch = joined(strategy.mbatch, to_device(batch, strategy.device))
            else:
                self._pending.append((batch, self.tasks[index].head))

    def before_backward(self, strategy, **kwargs) -> None:
        for batch, head in self._pending:
            strategy.loss += task_batch_loss(strategy, batch, head)
        self._pending = []


register("joint", acts_on=("data", "loss"))(JointTraining)
