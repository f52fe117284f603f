"""Forgetting, BWT and drops against hand-computed matrices, Avalanche's functional forgetting, Avalanche's StreamBWT
plugin metric on a real training run, and Mammoth's code."""
import math
import random

import numpy as np
import pytest
from avalanche.evaluation.functional import forgetting as avalanche_forgetting_matrix

from clmtl.metrics.forgetting import absolute_drop, bwt, drop_vs_baseline, forgetting, forgetting_max

# Task 0 peaks after experience 1 (0.85) and ends at 0.5; task 1 improves after its own experience.
R = [
    [0.80, None, None],
    [0.85, 0.90, None],
    [0.50, 0.95, 0.70],
]


def test_forgetting_hand_matrix():
    assert forgetting(R) == [pytest.approx(0.80 - 0.50), pytest.approx(0.90 - 0.95), None]


def test_forgetting_max_hand_matrix():
    # task 0: best 0.85 - final 0.5; task 1: best is the final 0.95, so 0 (never negative)
    assert forgetting_max(R) == [pytest.approx(0.35), pytest.approx(0.0), None]


def test_bwt_hand_matrix_is_minus_mean_forgetting():
    assert bwt(R) == pytest.approx(((0.50 - 0.80) + (0.95 - 0.90)) / 2)
    assert bwt(R) == pytest.approx(-np.mean([f for f in forgetting(R) if f is not None]))


def test_single_task_has_no_forgetting_or_bwt():
    assert forgetting([[0.7]]) == [None]
    assert forgetting_max([[0.7]]) == [None]
    assert bwt([[0.7]]) is None


def test_non_square_matrix_is_rejected():
    with pytest.raises(ValueError):
        forgetting([[0.5, 0.1], [0.4]])


# Mammoth's utils/metrics.py (aimagelab/mammoth), copied as the reference; `results[i]` lists the accuracies on
# tasks 0..i after task i.
def mammoth_forgetting(results):
    n_tasks = len(results)
    li = []
    for i in range(n_tasks - 1):
        results[i] += [0.0] * (n_tasks - len(results[i]))
    np_res = np.array(results)
    maxx = np.max(np_res, axis=0)
    for i in range(n_tasks - 1):
        li.append(maxx[i] - results[-1][i])
    return np.mean(li)


def mammoth_backward_transfer(results):
    n_tasks = len(results)
    li = []
    for i in range(n_tasks - 1):
        li.append(results[-1][i] - results[i][i])
    return np.mean(li)


def _random_matrix(rng: random.Random, T: int) -> list[list[float]]:
    """Lower triangle random scores; zero-shot entries above the diagonal are filled too and must be ignored."""
    return [[rng.random() for _ in range(T)] for _ in range(T)]


@pytest.mark.parametrize("seed", range(5))
def test_forgetting_equals_avalanche_functional_last_row(seed):
    matrix = _random_matrix(random.Random(seed), T=4)
    expected = avalanche_forgetting_matrix(matrix)[-1]
    ours = forgetting(matrix)
    assert ours[:-1] == pytest.approx(list(expected[:-1]))
    assert expected[-1] == 0 and ours[-1] is None  # the documented difference for the last task


@pytest.mark.parametrize("seed", range(5))
def test_forgetting_max_and_bwt_equal_mammoth(seed):
    matrix = _random_matrix(random.Random(seed), T=4)
    seen_so_far = [row[: i + 1] for i, row in enumerate(matrix)]  # Mammoth never scores unseen tasks
    assert np.mean(forgetting_max(matrix)[:-1]) == pytest.approx(mammoth_forgetting([list(r) for r in seen_so_far]))
    assert bwt(matrix) == pytest.approx(mammoth_backward_transfer(seen_so_far))


def test_bwt_equals_avalanche_stream_bwt_after_every_experience_of_a_run():
    """Avalanche's ``StreamBWT`` (its plugin metric, inside an ``EvaluationPlugin``) and ``bwt`` of the matrix of the
    same run's experience accuracies, after each experience (the matrix so far: ``(i + 1) x (i + 1)``)."""
    import torch
    from avalanche.benchmarks import benchmark_from_datasets
    from avalanche.benchmarks.utils import AvalancheDataset
    from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin
    from torch.utils.data import Subset, TensorDataset

    def task(seed: int) -> tuple[AvalancheDataset, AvalancheDataset]:
        """48 training and 40 test samples labelled by a random linear rule of the task's own: learning one task
        moves the weights the others need."""
        g = torch.Generator().manual_seed(seed)
        rule, x = torch.randn(6, 3, generator=g), torch.randn(88, 6, generator=g)
        data = TensorDataset(x, (x @ rule).argmax(1))
        return AvalancheDataset([Subset(data, range(48))]), AvalancheDataset([Subset(data, range(48, 88))])

    T = 4
    tasks = [task(t) for t in range(T)]
    stream = benchmark_from_datasets(train=[train for train, _ in tasks], test=[test for _, test in tasks])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True), bwt_metrics(stream=True), loggers=[])
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.3),
                     criterion=torch.nn.CrossEntropyLoss(), train_mb_size=8, train_epochs=8, eval_mb_size=40,
                     evaluator=evaluator, device="cpu")
    matrix, bwts = [], []
    for experience in stream.train_stream:
        strategy.train(experience)
        metrics = strategy.eval(stream.test_stream)
        matrix.append([metrics[f"Top1_Acc_Exp/eval_phase/test_stream/Exp{j:03}"] for j in range(T)])
        square = [row[: len(matrix)] for row in matrix]
        ours, theirs = bwt(square), metrics["StreamBWT/eval_phase/test_stream"]
        bwts.append(ours)
        if len(matrix) == 1:
            assert ours is None and theirs == 0  # no earlier task: Avalanche's mean of nothing is 0
        else:
            assert ours == pytest.approx(theirs, abs=1e-12)
    assert all(matrix[j][j] > 0.75 for j in range(T))  # every task is learnt...
    assert max(b for b in bwts if b is not None) < -0.2  # ...and forgotten: the comparison is not of zeros
    assert len({round(b, 6) for b in bwts if b is not None}) == T - 1  # nor of one value


def test_forgetting_max_differs_from_avalanche_when_the_peak_is_later():
    assert forgetting_max(R)[0] > forgetting(R)[0]


def test_drop_vs_baseline_relative_and_absolute():
    final = {"seg": 0.5, "det": 0.3, "cls": 0.9, "zero": 0.1, "nan": float("nan"), "new": 0.4}
    baseline = {"seg": 0.625, "det": 0.2, "cls": 0.9, "zero": 0.0, "nan": 0.5}
    relative = drop_vs_baseline(final, baseline)
    assert relative["seg"] == pytest.approx(0.2)  # 20% worse than baseline
    assert relative["det"] == pytest.approx(-0.5)  # better than baseline: negative
    assert relative["cls"] == 0.0
    assert relative["zero"] is None and relative["nan"] is None and relative["new"] is None
    absolute = {task: absolute_drop(baseline.get(task), value) for task, value in final.items()}
    assert absolute["seg"] == pytest.approx(0.125)
    assert absolute["det"] == pytest.approx(-0.1)
    assert absolute["zero"] == pytest.approx(-0.1)
    assert absolute["nan"] is None and absolute["new"] is None
    assert not any(isinstance(v, float) and math.isnan(v) for v in [*relative.values(), *absolute.values()])
