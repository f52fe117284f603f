"""The task scores and their forgetting as Avalanche plugin metrics.

``TaskMetrics`` scores each eval experience with its task's scorer (mIoU, COCO mAP or top-1) and emits every
metric of the task under Avalanche's naming, e.g. ``mIoU/eval_phase/test_stream/Task000/Exp000``.
``TaskForgetting`` / ``TaskStreamForgetting`` reuse Avalanche's forgetting bookkeeping
(``GenericExperienceForgetting`` / ``GenericStreamForgetting``) on the task's primary metric, read from the
``TaskMetrics`` they are built with, so each score is computed once. Build all three with ``task_metrics``.

Importing this module imports Avalanche (~4.5 s); ``clmtl.metrics`` itself does not.
"""
from __future__ import annotations

from typing import Callable, Sequence

from avalanche.evaluation.metric_definitions import PluginMetric
from avalanche.evaluation.metric_results import MetricValue
from avalanche.evaluation.metric_utils import get_metric_name
from avalanche.evaluation.metrics.forgetting_bwt import GenericExperienceForgetting, GenericStreamForgetting
from torch import Tensor

from clmtl import distributed
from clmtl.metrics.scores import CocoMAP, Scorer, scorer_for
from clmtl.tasks import DETECTION, TaskSpec

Decode = Callable[[list[Tensor]], list[dict]]


class TaskMetrics(PluginMetric[dict[str, float]]):
    """Scores of the task of each eval experience; silent during training.

    ``tasks[t]`` describes task label ``t``. ``decode`` turns a raw detection output into per-image
    ``{"boxes", "scores", "labels"}`` dicts and is required when a task is a detection task.
    """

    def __init__(self, tasks: Sequence[TaskSpec], decode: Decode | None = None) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        if decode is None and any(task.kind == DETECTION for task in self.tasks):
            raise ValueError("a detection task needs `decode` to turn raw outputs into boxes")
        self.decode = decode
        self.scorers: list[Scorer] = [scorer_for(task) for task in self.tasks]
        self.task_label: int | None = None
        """Task label of the experience being evaluated (or last evaluated)."""

    def reset(self) -> None:
        for scorer in self.scorers:
            scorer.reset()

    def result(self) -> dict[str, float]:
        """All metrics of the current eval experience's task, e.g. ``{"mAP50_95": ..., "mAP50": ...}``."""
        return {} if self.task_label is None else self.scorers[self.task_label].result()

    def before_eval_exp(self, strategy) -> None:
        task_label = strategy.experience.task_label
        if not 0 <= task_label < len(self.tasks):
            raise ValueError(f"eval experience has task label {task_label}, but only {len(self.tasks)} tasks are known")
        self.task_label = task_label
        scorer = self.scorers[task_label]
        if isinstance(scorer, CocoMAP) and distributed.is_distributed():  # this process scores a slice of the set
            start, _ = distributed.shard_bounds(len(strategy.experience.dataset), distributed.rank(),
                                                distributed.world_size())
            scorer.first_image_id = start + 1
        scorer.reset()

    def after_eval_iteration(self, strategy) -> None:
        super().after_eval_iteration(strategy)
        output = strategy.mb_output
        if self.tasks[self.task_label].kind == DETECTION:
            output = self.decode(output)
        self.scorers[self.task_label].update(output, strategy.mb_y)

    def after_eval_exp(self, strategy) -> list[MetricValue]:
        if distributed.is_distributed():  # every process scored its slice: score the whole set, on every process
            shards = distributed.gather(self.scorers[self.task_label])
            for shard in shards[1:]:
                shards[0].merge(shard)
            self.scorers[self.task_label] = shards[0]
        x_position = strategy.clock.train_iterations
        return [
            MetricValue(self, get_metric_name(name, strategy, add_experience=True), value, x_position)
            for name, value in self.result().items()
        ]

    def __str__(self) -> str:
        return "TaskMetrics"


def _primary_score(scores: TaskMetrics, strategy) -> float:
    """The primary metric of the experience being evaluated, as ``scores`` computed it."""
    if scores.task_label is None or scores.task_label != strategy.experience.task_label:
        raise RuntimeError("task forgetting reads its TaskMetrics: add that TaskMetrics to the same EvaluationPlugin")
    return scores.result()[scores.tasks[scores.task_label].metric]


class TaskForgetting(GenericExperienceForgetting[TaskMetrics, dict[int, float], float | None]):
    """Per-experience forgetting of the task's primary metric: score right after training it minus score now.

    Emitted as ``TaskForgetting/eval_phase/test_stream/Task00t/Exp00e`` once the experience has been trained and a
    later one too (Avalanche's rule: the initial value is the eval right after training that experience).
    """

    def __init__(self, scores: TaskMetrics) -> None:
        super().__init__(scores)

    def result_key(self, k: int) -> float | None:
        return self.forgetting.result_key(k=k)

    def result(self) -> dict[int, float]:
        return self.forgetting.result()

    def metric_update(self, strategy) -> None:
        """Nothing: the shared TaskMetrics accumulates the scores."""

    def metric_result(self, strategy) -> float:
        return _primary_score(self._current_metric, strategy)

    def __str__(self) -> str:
        return "TaskForgetting"


class TaskStreamForgetting(GenericStreamForgetting[TaskMetrics]):
    """Mean ``TaskForgetting`` over the trained experiences, as ``TaskStreamForgetting/eval_phase/test_stream``.

    It averages different metrics (mIoU, mAP, top-1) of different tasks with equal weight.
    """

    def __init__(self, scores: TaskMetrics) -> None:
        super().__init__(scores)

    def metric_update(self, strategy) -> None:
        """Nothing: the shared TaskMetrics accumulates the scores."""

    def metric_result(self, strategy) -> float:
        return _primary_score(self._current_metric, strategy)

    def __str__(self) -> str:
        return "TaskStreamForgetting"


def task_metrics(
    tasks: Sequence[TaskSpec], decode: Decode | None = None, *, forgetting: bool = True, stream_forgetting: bool = True
) -> list[PluginMetric]:
    """``TaskMetrics`` plus the forgetting metrics that share it, ready for ``EvaluationPlugin(*task_metrics(...))``."""
    scores = TaskMetrics(tasks, decode)
    metrics: list[PluginMetric] = [scores]
    if forgetting:
        metrics.append(TaskForgetting(scores))
    if stream_forgetting:
        metrics.append(TaskStreamForgetting(scores))
    return metrics


def metric_key(task_label: int, exp_id: int, metric: str, stream: str = "test") -> str:
    """The name Avalanche gives an eval metric of one experience, e.g. ``mIoU/eval_phase/test_stream/Task000/Exp000``."""
    return f"{metric}/eval_phase/{stream}_stream/Task{task_label:03}/Exp{exp_id:03}"


def task_scores(
    metrics: dict[str, float], tasks: Sequence[TaskSpec], stream: str = "test"
) -> list[dict[str, float] | None]:
    """Every metric (primary and extra) of every task from one ``strategy.eval()`` result.

    ``None`` for a task that was not evaluated (none of its metrics present); a task with only some of its metrics
    present raises ``KeyError``. Assumes one experience per task, experience id = task label, as
    ``clmtl.stream`` builds the stream.
    """
    rows: list[dict[str, float] | None] = []
    for label, task in enumerate(tasks):
        keys = {name: metric_key(label, label, name, stream) for name in (task.metric, *task.extra_metrics)}
        missing = [key for key in keys.values() if key not in metrics]
        if len(missing) == len(keys):
            rows.append(None)
            continue
        if missing:
            raise KeyError(f"metrics of task {task.name!r} missing from the eval results: {missing}")
        rows.append({name: float(metrics[key]) for name, key in keys.items()})
    return rows


def accuracy_row(metrics: dict[str, float], tasks: Sequence[TaskSpec], stream: str = "test") -> list[float | None]:
    """Row ``R[i]`` of the accuracy matrix: the primary metric of every task (``None`` if not evaluated)."""
    return [
        None if scores is None else scores[task.metric]
        for scores, task in zip(task_scores(metrics, tasks, stream), tasks)
    ]
