"""The task scores and their forgetting as Avalanche plugin metrics.

``TaskMetrics`` scores each eval experience with its task's scorer (mIoU, COCO mAP or top-1) and emits every
metric of the task under Avalanche's naming, e.g. ``mIoU/eval_phase/test_stream/Task000/Exp000``.
``TaskForgetting`` / ``TaskStreamForgetting`` reuse Avalanche's forgetting bookkeeping
(``GenericExperienceForgetting`` / ``GenericStreamForgetting``) on the task's primary metric, read from the
``TaskMetrics`` they are built with, so each score is computed once. Build all three with ``task_metrics``.

Importing this module imports Avalanche (~4.5 s); ``clmtl.metrics`` itself does not.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from avalanche.evaluation.metric_definitions import PluginMetric
from avalanche.evaluation.metric_results import MetricValue
from avalanche.evaluation.metric_utils import get_metric_name
from avalanche.evaluation.metrics.forgetting_bwt import GenericExperienceForgetting, GenericStreamForgetting
from torch import Tensor

from clmtl.metrics.scores import CocoMAP, Scorer, scorer_for, update_segmentation
from clmtl.models.decode import predict
from clmtl.stream.scenario import output_spaces, placed
from clmtl.stream.tasks import DETECTION, SEGMENTATION, TaskSpec
from clmtl.training import distributed

Decode = Callable[[list[Tensor]], list[dict]]


class TaskMetrics(PluginMetric[dict[str, float]]):
    """Scores of the task of each eval experience; silent during training.

    ``tasks[e]`` describes experience ``e`` of the stream (its task label is ``tasks[e].head``). ``decode`` turns a
    raw detection output into per-image ``{"boxes", "scores", "labels"}`` dicts and is required when a task is a
    detection task. ``datasets[e]``, experience ``e``'s evaluation set, lets a segmentation task with its files'
    label maps be scored at their resolution (``update_segmentation``).
    """

    def __init__(self, tasks: Sequence[TaskSpec], decode: Decode | None = None,
                 datasets: Sequence[Any] = ()) -> None:
        super().__init__()
        self.tasks = tuple(placed(tasks))
        self.datasets = tuple(datasets)
        self.position = 0
        """Index in its evaluation set of the next sample of the experience being evaluated."""
        if decode is None and any(task.kind == DETECTION for task in self.tasks):
            raise ValueError("a detection task needs `decode` to turn raw outputs into boxes")
        self.decode = decode
        spaces = output_spaces(self.tasks)
        self.scorers: list[Scorer] = [scorer_for(task, spaces[task.head]) for task in self.tasks]
        self.experience: int | None = None
        """Index of the experience being evaluated (or last evaluated)."""

    def reset(self) -> None:
        for scorer in self.scorers:
            scorer.reset()

    def result(self) -> dict[str, float]:
        """All metrics of the current eval experience's task, e.g. ``{"mAP50_95": ..., "mAP50": ...}``."""
        return {} if self.experience is None else self.scorers[self.experience].result()

    def before_eval_exp(self, strategy) -> None:
        index = strategy.experience.current_experience
        if not 0 <= index < len(self.tasks) or strategy.experience.task_label != self.tasks[index].head:
            raise ValueError(f"eval experience {index} (task label {strategy.experience.task_label}) is not one of "
                             f"the {len(self.tasks)} tasks these metrics score")
        self.experience = index
        scorer = self.scorers[index]
        self.position = 0
        if distributed.is_distributed():  # this process scores a slice of the set
            self.position, _ = distributed.shard_bounds(len(strategy.experience.dataset), distributed.rank(),
                                                        distributed.world_size())
            if isinstance(scorer, CocoMAP):
                scorer.first_image_id = self.position + 1
        scorer.reset()

    def after_eval_iteration(self, strategy) -> None:
        super().after_eval_iteration(strategy)
        task, scorer = self.tasks[self.experience], self.scorers[self.experience]
        if task.kind == SEGMENTATION:
            dataset = self.datasets[self.experience] if self.datasets else None
            update_segmentation(scorer, strategy.mb_output, strategy.mb_y, dataset, self.position)
        else:
            scorer.update(predict(strategy.mb_output, task.kind, self.decode), strategy.mb_y)
        self.position += len(strategy.mb_y)

    def after_eval_exp(self, strategy) -> list[MetricValue]:
        if distributed.is_distributed():  # every process scored its slice: score the whole set, on every process
            shards = distributed.gather(self.scorers[self.experience])
            for shard in shards[1:]:
                shards[0].merge(shard)
            self.scorers[self.experience] = shards[0]
        x_position = strategy.clock.train_iterations
        return [
            MetricValue(self, get_metric_name(name, strategy, add_experience=True), value, x_position)
            for name, value in self.result().items()
        ]

    def __str__(self) -> str:
        return "TaskMetrics"


def _primary_score(scores: TaskMetrics, strategy) -> float:
    """The primary metric of the experience being evaluated, as ``scores`` computed it."""
    if scores.experience is None or scores.experience != strategy.experience.current_experience:
        raise RuntimeError("task forgetting reads its TaskMetrics: add that TaskMetrics to the same EvaluationPlugin")
    return scores.result()[scores.tasks[scores.experience].metric]


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
    tasks: Sequence[TaskSpec], decode: Decode | None = None, *, forgetting: bool = True, stream_forgetting: bool = True,
    datasets: Sequence[Any] = ()
) -> list[PluginMetric]:
    """``TaskMetrics`` plus the forgetting metrics that share it, ready for ``EvaluationPlugin(*task_metrics(...))``."""
    scores = TaskMetrics(tasks, decode, datasets)
    metrics: list[PluginMetric] = [scores]
    if forgetting:
        metrics.append(TaskForgetting(scores))
    if stream_forgetting:
        metrics.append(TaskStreamForgetting(scores))
    return metrics


def metric_key(task_label: int, exp_id: int, metric: str, stream: str = "test") -> str:
    """The name Avalanche gives an eval metric of one experience (``mIoU/eval_phase/test_stream/Task000/Exp000``)."""
    return f"{metric}/eval_phase/{stream}_stream/Task{task_label:03}/Exp{exp_id:03}"


def task_scores(
    metrics: dict[str, float], tasks: Sequence[TaskSpec], stream: str = "test"
) -> list[dict[str, float] | None]:
    """Every metric (primary and extra) of every task from one ``strategy.eval()`` result.

    ``None`` for a task that was not evaluated (none of its metrics present); a task with only some of its metrics
    present raises ``KeyError``. Task ``e`` is experience ``e``, with task label ``tasks[e].head``, as
    ``clmtl.stream.experiences`` builds the stream.
    """
    rows: list[dict[str, float] | None] = []
    for index, task in enumerate(placed(tasks)):
        keys = {name: metric_key(task.head, index, name, stream) for name in (task.metric, *task.extra_metrics)}
        missing = [key for key in keys.values() if key not in metrics]
        if len(missing) == len(keys):
            rows.append(None)
            continue
        if missing:
            raise KeyError(f"metrics of task {task.name!r} missing from the eval results: {missing}")
        rows.append({name: float(metrics[key]) for name, key in keys.items()})
    return rows
