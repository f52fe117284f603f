"""Forgetting, BWT and drops against hand-computed matrices, Avalanche's functional forgetting and Mammoth's code."""
import math
import random

import numpy as np
import pytest
from avalanche.evaluation.functional import forgetting as avalanche_forgetting_matrix

from clmtl.metrics.forgetting import abs_drop, bwt, drop_vs_baseline, forgetting, forgetting_max

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
    absolute = abs_drop(final, baseline)
    assert absolute["seg"] == pytest.approx(0.125)
    assert absolute["det"] == pytest.approx(-0.1)
    assert absolute["zero"] == pytest.approx(-0.1)
    assert absolute["nan"] is None and absolute["new"] is None
    assert not any(isinstance(v, float) and math.isnan(v) for v in [*relative.values(), *absolute.values()])
