"""A cross-check of clmtl's strategies: Avalanche's own stock strategies on the same data, model and budget.

``train_avalanche(config, "EWC", {"ewc_lambda": ...})`` trains ``avalanche.training.EWC`` (or ``Naive``,
``SynapticIntelligence``, ``LwF``, ``Replay``) on ``clmtl.build_benchmark(config).stream``, with the config's ``mlp``
body (``clmtl.models.classifier.mlp``), seed, optimizer, batch sizes and per-task budget, and Avalanche's own heads:

- scenario ``task``: ``MultiHeadClassifier`` (one head per task label, units masked to the classes trained);
- scenario ``class``: ``IncrementalClassifier`` (one head that grows with the classes, unseen ones masked: van de
  Ven's "active units");
- scenario ``domain``: one plain ``nn.Linear``.

Each experience trains exactly ``iterations`` mini-batches where the task's budget counts them (``Benchmark.budget``),
across as many epochs as it takes, else ``epochs`` epochs; then the whole test stream is evaluated with Avalanche's
``accuracy_metrics(experience=True)``, giving the accuracy matrix ``R[i][j]`` (test experience ``j`` after training
experience ``i``). The optimizer state is reset at every experience or kept for the stream as ``train.reset_optimizer``
says, as for clmtl's own runs.

Avalanche behaviours a reproduction must know (Avalanche 0.6):

- Evaluating a test experience of a task not trained yet adapts the model in eval mode: ``MultiHeadClassifier``
  creates that task's head then (its units all masked, so it predicts class 0), and ``IncrementalClassifier`` grows
  its rows (masked). The head a task later trains is the one its early evaluation created, and these creations draw
  from torch's random generator between experiences. ``R[i][j]`` for a task ``j`` not trained yet is therefore
  the share of label 0 in its test set (task scenario) or 0 (class scenario), not an untrained model's accuracy.
- ``EWC``'s importance is the mean over mini-batches (of ``train_mb_size``) of the squared *mini-batch* gradient of
  the loss on the true labels, not a per-sample Fisher (about 180 times smaller at batch 128 on Split MNIST, and near
  0 once a task is learned), and the penalty is ``ewc_lambda * sum F (theta - theta*)^2`` (no 1/2): its
  ``ewc_lambda`` is on another scale than the papers' (1e10 here where 1e2..1e4 do next to nothing).
- ``SynapticIntelligence`` does nothing on the CPU: its ``extract_weights`` stores ``param.detach().cpu().flatten()``,
  which on the CPU is a view of the live parameter, so the weights before an update equal those after it (every
  path-integral term is 0) and the anchor moves with the weights (every penalty is 0): its results equal ``Naive``'s
  bit for bit (the symptom of the open ContinualAI/continual-learning-baselines#74). ``train_avalanche`` runs it
  with that one function copying the weights (``si_copies_weights``), as ``.cpu()`` does for a GPU model. It also
  clips every parameter's importance to at most 0.001 (not from below), and accumulates the path integral with the
  gradient of the regularized loss, penalty included.
- ``LwF`` on a multi-task model distills every previously trained head, through a second forward pass of all heads;
  on a single head (class scenario) it distills the logits of the classes of earlier experiences only. It reads the
  experience's ``dataset.task_set``, which clmtl's plain ``AvalancheDataset``s lack (``AttributeError``):
  ``train_avalanche`` trains on the same samples wrapped as Avalanche's task-aware classification dataset.
- ``Replay`` adds a memory mini-batch of ``train_mb_size`` to every mini-batch (twice the batch); an epoch still ends
  with the current experience's data, so the loader's length is unchanged, and the budget counts mini-batches.
"""
from __future__ import annotations

import contextlib
import copy
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import avalanche.training
import torch
from avalanche.benchmarks.utils.classification_dataset import TaskAwareSupervisedClassificationDataset
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.models import IncrementalClassifier, MultiHeadClassifier, MultiTaskModule
from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin, SynapticIntelligencePlugin
from torch import nn

from clmtl.models.classifier import mlp
from clmtl.stream.benchmark import build_benchmark
from clmtl.training.devices import resolve_device

AVALANCHE_STRATEGIES = ("Naive", "EWC", "SynapticIntelligence", "LwF", "Replay")

DEFAULT_HYPERPARAMETERS: dict[str, dict[str, float]] = {
    "Naive": {},
    "EWC": {"ewc_lambda": 1e10},
    "SynapticIntelligence": {"si_lambda": 100.0, "eps": 0.1},
    "LwF": {"alpha": 1.0, "temperature": 2.0},
    "Replay": {"mem_size": 1000},
}
"""Each strategy's hyperparameters (its Avalanche constructor's keyword arguments) and their defaults; a call's
``hyperparameters`` replace some of them. ``ewc_lambda`` and ``si_lambda`` are the best of 1e2..1e10 and 1..1e4 on
task-incremental Split MNIST (784-400-400, Adam 1e-3, batch 128, 500 iterations a task): Avalanche's EWC importance
is tiny (module docstring), and SI's importance is clipped."""

_INTEGER_HYPERPARAMETERS = ("mem_size",)


def train_avalanche(config, strategy: str, hyperparameters: Mapping[str, float] = {}) -> dict:
    """Train Avalanche's ``strategy`` on the config's stream; returns ``{"matrix": R, "average_accuracy": mean of
    R's last row, "strategy": "avalanche:<strategy>", "seconds": wall time of training and evaluating (not of
    loading the data), "iterations": mini-batches trained in each experience}``."""
    kwargs = _strategy_kwargs(strategy, hyperparameters)
    if config.model.backbone != "mlp":
        raise ValueError(f"train_avalanche builds the mlp backbone only; model.backbone is {config.model.backbone!r}")
    benchmark = build_benchmark(config)
    others = sorted({task.kind for task in benchmark.tasks} - {"classification"})
    if others:
        raise ValueError(f"train_avalanche serves classification tasks only; the stream has {', '.join(others)}")
    torch.manual_seed(config.seed)
    model = build_reference_model(config, benchmark.tasks)
    budget = IterationBudget([benchmark.budget(index) for index in range(len(benchmark.tasks))])
    with warnings.catch_warnings():  # "No loggers specified": the metrics are read from the evaluator
        warnings.simplefilter("ignore")
        evaluator = EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])
    learner = getattr(avalanche.training, strategy)(  # Avalanche's own class of that name
        model=model, optimizer=make_optimizer(config, model), criterion=nn.CrossEntropyLoss(),
        train_mb_size=config.train.batch_size, eval_mb_size=config.train.eval_batch_size, train_epochs=1,
        device=resolve_device(config.train.device), plugins=[budget], evaluator=evaluator, **kwargs)
    stream = benchmark.stream
    start = time.perf_counter()
    matrix, iterations = [], []
    with si_copies_weights() if strategy == "SynapticIntelligence" else contextlib.nullcontext():
        for experience in map(task_aware, stream.train_stream):
            learner.train(experience, eval_streams=[], reset_optimizer_state=config.train.reset_optimizer)
            iterations.append(learner.clock.train_exp_iterations)
            metrics = learner.eval(stream.test_stream)
            matrix.append([_accuracy(metrics, test) for test in stream.test_stream])
    seconds = time.perf_counter() - start
    return {"matrix": matrix, "average_accuracy": sum(matrix[-1]) / len(matrix[-1]),
            "strategy": f"avalanche:{strategy}", "seconds": seconds, "iterations": iterations}


def _strategy_kwargs(strategy: str, hyperparameters: Mapping[str, float]) -> dict[str, Any]:
    """The strategy's constructor keywords: its defaults with ``hyperparameters`` in place; refuses unknown names."""
    if strategy not in AVALANCHE_STRATEGIES:
        raise ValueError(f"unknown Avalanche strategy {strategy!r}; expected one of {', '.join(AVALANCHE_STRATEGIES)}")
    defaults = DEFAULT_HYPERPARAMETERS[strategy]
    unknown = sorted(set(hyperparameters) - set(defaults))
    if unknown:
        allowed = ", ".join(defaults) or "none"
        raise ValueError(f"{strategy} has no hyperparameter {', '.join(map(repr, unknown))}; it takes: {allowed}")
    kwargs: dict[str, Any] = {**defaults, **hyperparameters}
    for name in _INTEGER_HYPERPARAMETERS:
        if name in kwargs:
            kwargs[name] = int(kwargs[name])
    return kwargs


def make_optimizer(config, model: nn.Module) -> torch.optim.Optimizer:
    """``train.optimizer`` over every parameter at ``train.lr`` (SGD with momentum 0.9), as clmtl builds it."""
    train = config.train
    if train.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=train.lr, momentum=0.9, weight_decay=train.weight_decay)
    optimizer_class = torch.optim.AdamW if train.optimizer == "adamw" else torch.optim.Adam
    return optimizer_class(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)


def build_reference_model(config, tasks: Sequence) -> nn.Module:
    """clmtl's ``mlp`` body (``Flatten``, then ``Linear + ReLU`` per ``model.hidden`` size) with Avalanche's head
    for ``config.scenario`` (module docstring)."""
    data = config.data
    body, features = mlp(data.channels * data.image_size * data.image_size, config.model.hidden)
    classes = len(tasks[0].labels)  # the first task's classes: every head starts with as many units
    if config.scenario == "task":
        return MultiHeadMLP(body, MultiHeadClassifier(features, initial_out_features=classes))
    if config.scenario == "class":
        return nn.Sequential(body, IncrementalClassifier(features, initial_out_features=classes))
    return nn.Sequential(body, nn.Linear(features, classes))


class MultiHeadMLP(MultiTaskModule):
    """``body`` then a ``MultiHeadClassifier`` that picks each sample's head by its task label (``MTSimpleMLP``'s
    pattern, without its dropout)."""

    def __init__(self, body: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.features = body
        self.classifier = classifier

    def forward(self, x: torch.Tensor, task_labels) -> torch.Tensor:
        return self.classifier(self.features(x), task_labels)

    def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
        return self.classifier.forward_single_task(self.features(x), task_label)


class IterationBudget(SupervisedPlugin):
    """Ends each experience's training after its budget: ``iterations`` mini-batches where set (over as many epochs
    as that takes, whatever the loader's length), else ``epochs`` epochs. ``budgets[i]`` is experience ``i``'s
    ``(epochs, iterations)`` (``Benchmark.budget``)."""

    def __init__(self, budgets: Sequence[tuple[int, int | None]]) -> None:
        super().__init__()
        self.budgets = list(budgets)
        self.limit: int | None = None
        self.done = 0

    def before_training_exp(self, strategy, **kwargs) -> None:
        epochs, iterations = self.budgets[strategy.experience.current_experience]
        self.limit, self.done = iterations, 0
        # every epoch trains at least one mini-batch, so `iterations` epochs always reach the budget
        strategy.train_epochs = epochs if iterations is None else max(1, iterations)

    def after_training_iteration(self, strategy, **kwargs) -> None:
        self.done += 1
        if self.limit is not None and self.done >= self.limit:
            strategy.stop_training()


@contextlib.contextmanager
def si_copies_weights():
    """While inside, ``SynapticIntelligencePlugin.extract_weights`` stores a copy of each weight instead of a view
    of it (a view, on the CPU, follows the weight: module docstring); the stock function is put back after."""
    stock = SynapticIntelligencePlugin.__dict__["extract_weights"]

    @torch.no_grad()
    def extract_weights(model: nn.Module, target, excluded_parameters) -> None:
        for name, param in SynapticIntelligencePlugin.allowed_parameters(model, excluded_parameters):
            target[name].data = param.detach().cpu().flatten().clone()

    SynapticIntelligencePlugin.extract_weights = staticmethod(extract_weights)
    try:
        yield
    finally:
        SynapticIntelligencePlugin.extract_weights = stock


def task_aware(experience):
    """A copy of ``experience`` whose dataset is the same samples as Avalanche's task-aware classification dataset,
    which has the ``task_set`` that ``LwF`` reads (clmtl's experiences are plain ``AvalancheDataset``s)."""
    aware = copy.copy(experience)
    aware._dataset = TaskAwareSupervisedClassificationDataset([experience.dataset])
    return aware


def _accuracy(metrics: Mapping[str, float], experience) -> float:
    """Avalanche's experience accuracy of test ``experience`` in the evaluator's last metrics."""
    stream, task, index = experience.origin_stream.name, experience.task_labels[0], experience.current_experience
    return float(metrics[f"Top1_Acc_Exp/eval_phase/{stream}_stream/Task{task:03d}/Exp{index:03d}"])


__all__ = ["AVALANCHE_STRATEGIES", "DEFAULT_HYPERPARAMETERS", "train_avalanche", "build_reference_model",
           "IterationBudget", "si_copies_weights"]
