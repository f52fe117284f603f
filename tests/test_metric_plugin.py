"""TaskMetrics and TaskForgetting inside Avalanche's EvaluationPlugin, checked against Avalanche's own metrics."""
from types import SimpleNamespace

import pytest
import torch
from avalanche.benchmarks.scenarios import benchmark_from_datasets, task_incremental_benchmark
from avalanche.benchmarks.utils import AvalancheDataset
from avalanche.evaluation.functional import forgetting as avalanche_forgetting_matrix
from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics
from avalanche.models import MultiTaskModule
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from torch import nn
from torch.utils.data import TensorDataset

from clmtl.metrics.forgetting import forgetting
from clmtl.metrics.plugin import (TaskForgetting, TaskMetrics, metric_key, task_metrics, task_scores)
from clmtl.metrics.scores import CocoMAP, MeanIoU
from clmtl.stream.tasks import TaskSpec


def accuracy_row(metrics, tasks):
    """Row R[i] of the accuracy matrix: the primary metric of every task (None if not evaluated)."""
    return [None if scores is None else scores[task.metric] for scores, task in zip(task_scores(metrics, tasks), tasks)]

N_TASKS = 3
CLS_TASKS = [TaskSpec(f"cls{t}", "classification", ("a", "b", "c")) for t in range(N_TASKS)]


class TinyMultiHead(MultiTaskModule):
    """Shared 4-unit body, one fixed head per task: small enough that later tasks disturb earlier ones."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2 * N_TASKS, 4), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(4, 3) for _ in range(N_TASKS))

    def adaptation(self, experience) -> None:
        pass  # fixed heads

    def forward(self, x, task_labels):
        return self.forward_single_task(x, int(task_labels[0]))  # batches hold one task

    def forward_single_task(self, x, task_label):
        return self.heads[task_label](self.body(x))


def _task_dataset(x: torch.Tensor, task: int) -> AvalancheDataset:
    """Task t: 3 classes from input features 2t and 2t+1."""
    y = (x[:, 2 * task] > 0).long() + (x[:, 2 * task + 1] > 0.5).long()
    return AvalancheDataset([TensorDataset(x, y)])


@pytest.fixture(scope="module")
def run():
    torch.manual_seed(0)
    x_train, x_test = torch.randn(60, 2 * N_TASKS), torch.randn(60, 2 * N_TASKS)
    benchmark = task_incremental_benchmark(benchmark_from_datasets(
        train=[_task_dataset(x_train, t) for t in range(N_TASKS)],
        test=[_task_dataset(x_test, t) for t in range(N_TASKS)],
    ))
    evaluator = EvaluationPlugin(
        *task_metrics(CLS_TASKS),
        accuracy_metrics(experience=True),
        forgetting_metrics(experience=True, stream=True),
        loggers=[],
    )
    model = TinyMultiHead()
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                     criterion=nn.CrossEntropyLoss(), train_mb_size=16, train_epochs=3, eval_mb_size=25,
                     evaluator=evaluator, device="cpu")
    evals = []
    for experience in benchmark.train_stream:
        strategy.train(experience)
        evals.append(strategy.eval(benchmark.test_stream))
    return evals, evaluator.get_all_metrics()


def test_top1_equals_avalanche_accuracy_for_every_experience(run):
    evals, _ = run
    for metrics in evals:
        for t in range(N_TASKS):
            ours = metrics[metric_key(t, t, "top1")]
            assert ours == pytest.approx(metrics[f"Top1_Acc_Exp/eval_phase/test_stream/Task{t:03}/Exp{t:03}"])
    assert accuracy_row(evals[-1], CLS_TASKS) == [evals[-1][metric_key(t, t, "top1")] for t in range(N_TASKS)]


def test_task_forgetting_equals_avalanche_experience_forgetting(run):
    evals, _ = run
    for metrics in evals:
        ours = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("TaskForgetting/")}
        theirs = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("ExperienceForgetting/")}
        assert ours == pytest.approx(theirs)
        stream_key = "StreamForgetting/eval_phase/test_stream"
        assert metrics[f"Task{stream_key}"] == pytest.approx(metrics[stream_key])
    assert len(ours) == N_TASKS - 1
    assert any(abs(v) > 0.01 for v in ours.values())  # the run does forget: the comparison is not 0 == 0


def test_forgetting_of_our_matrix_equals_avalanche(run):
    evals, _ = run
    R = [accuracy_row(metrics, CLS_TASKS) for metrics in evals]
    final = evals[-1]
    for t, value in enumerate(forgetting(R)[:-1]):
        assert value == pytest.approx(final[f"ExperienceForgetting/eval_phase/test_stream/Task{t:03}/Exp{t:03}"])
    assert forgetting(R)[:-1] == pytest.approx(list(avalanche_forgetting_matrix(R)[-1][:-1]))


def test_nothing_is_emitted_during_training(run):
    _, history = run
    ours = [name for name in history if name.split("/")[0] in ("top1", "TaskForgetting", "TaskStreamForgetting")]
    assert ours and all("/eval_phase/" in name for name in ours)


# --- segmentation and detection, driven through the callbacks with a stand-in strategy -------------------------

SEG = TaskSpec("seg", "segmentation", ("background", "a", "b"))
DET = TaskSpec("det", "detection", ("a", "b"))


def _strategy(task_label: int) -> SimpleNamespace:
    experience = SimpleNamespace(task_label=task_label, task_labels=[task_label], current_experience=task_label,
                                 origin_stream=SimpleNamespace(name="test"))
    return SimpleNamespace(experience=experience, is_eval=True, clock=SimpleNamespace(train_iterations=7))


def _decode(raw: list[torch.Tensor]) -> list[dict]:
    """Stand-in decoder: one tensor [B, K, 6] of (x1, y1, x2, y2, score, label) rows."""
    return [{"boxes": rows[:, :4], "scores": rows[:, 4], "labels": rows[:, 5].long()} for rows in raw[0]]


def _eval_experience(metric: TaskMetrics, strategy, batches) -> dict[str, float]:
    metric.before_eval_exp(strategy)
    for output, target in batches:
        strategy.mb_output, strategy.mb_y = output, target
        metric.after_eval_iteration(strategy)
    return {value.name: value.value for value in metric.after_eval_exp(strategy)}


def test_segmentation_and_detection_scores_and_names():
    generator = torch.Generator().manual_seed(1)
    seg_batches = [(torch.randn(2, 3, 8, 8, generator=generator), torch.randint(0, 3, (2, 8, 8), generator=generator))
                   for _ in range(2)]
    det_targets = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1])},
                   {"boxes": torch.tensor([[5.0, 5.0, 20.0, 25.0]]), "labels": torch.tensor([0])}]
    raw = [torch.tensor([[[0.0, 0.0, 10.0, 12.0, 0.9, 1.0]], [[5.0, 5.0, 20.0, 20.0, 0.8, 0.0]]])]
    metric = TaskMetrics([SEG, DET], decode=_decode)

    seg = _eval_experience(metric, _strategy(0), seg_batches)
    expected_seg = MeanIoU(3)
    for output, target in seg_batches:
        expected_seg.update(output, target)
    assert seg == {"mIoU/eval_phase/test_stream/Task000/Exp000": pytest.approx(expected_seg.result()["mIoU"]),
                   "mIoU_fg/eval_phase/test_stream/Task000/Exp000": pytest.approx(expected_seg.result()["mIoU_fg"])}

    det = _eval_experience(metric, _strategy(1), [(raw, det_targets)])
    expected_det = CocoMAP()
    expected_det.update(_decode(raw), det_targets)
    assert det == {
        "mAP50_95/eval_phase/test_stream/Task001/Exp001": pytest.approx(expected_det.result()["mAP50_95"]),
        "mAP50/eval_phase/test_stream/Task001/Exp001": pytest.approx(expected_det.result()["mAP50"]),
    }
    assert 0 < expected_det.result()["mAP50_95"] < 1

    both = {**seg, **det}
    assert accuracy_row(both, [SEG, DET]) == [seg[metric_key(0, 0, "mIoU")], det[metric_key(1, 1, "mAP50_95")]]
    assert task_scores(both, [SEG, DET])[1] == {"mAP50_95": det[metric_key(1, 1, "mAP50_95")],
                                                "mAP50": det[metric_key(1, 1, "mAP50")]}
    assert accuracy_row(seg, [SEG, DET]) == [seg[metric_key(0, 0, "mIoU")], None]  # det not evaluated
    with pytest.raises(KeyError):
        accuracy_row({**seg, metric_key(1, 1, "mAP50_95"): 0.5}, [SEG, DET])  # mAP50 missing: a bug, not a gap


def test_scores_restart_with_each_eval_experience():
    metric = TaskMetrics([SEG])
    target = torch.zeros(1, 4, 4, dtype=torch.long)

    def logits(labels):  # what the model emits: [B, C, H, W], highest at ``labels``
        return torch.nn.functional.one_hot(labels, len(SEG.classes)).permute(0, 3, 1, 2).float()

    _eval_experience(metric, _strategy(0), [(logits(target + 1), target)])  # all wrong
    again = _eval_experience(metric, _strategy(0), [(logits(target), target)])  # all right
    assert again[metric_key(0, 0, "mIoU")] == pytest.approx(1.0)


def test_detection_needs_a_decoder():
    with pytest.raises(ValueError):
        TaskMetrics([SEG, DET])


def test_task_forgetting_refuses_to_run_without_its_task_metrics():
    forgetting_metric = TaskForgetting(TaskMetrics([SEG]))
    strategy = _strategy(0)
    strategy.mb_output, strategy.mb_y = torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long)
    forgetting_metric.after_eval_iteration(strategy)
    with pytest.raises(RuntimeError):
        forgetting_metric.after_eval_exp(strategy)
