"""Forgetting, backward and forward transfer, average accuracy and drop-vs-baseline from the accuracy matrix.

``R[i][j]`` is the metric of task ``j`` (higher is better) after training experience ``i``; one experience per task,
so ``R`` is ``T x T`` and ``R[j][j]`` is the score right after learning task ``j``. Entries with ``j > i``
(zero-shot) may be ``None`` and are never used. Values that cannot be defined are ``None`` (JSON ``null``),
never NaN.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

Matrix = Sequence[Sequence[Optional[float]]]


def _square_size(R: Matrix) -> int:
    T = len(R)
    if any(len(row) != T for row in R):
        raise ValueError(f"accuracy matrix must be T x T, got rows of lengths {[len(row) for row in R]}")
    return T


def forgetting(R: Matrix) -> list[float | None]:
    """Avalanche's forgetting per task: ``R[j][j] - R[T-1][j]``; ``None`` for the last task.

    Same numbers as Avalanche's ``ExperienceForgetting`` after the last experience (it records the "initial" value
    when the eval experience is the one just trained, and reports initial - last) and as the last row of
    ``avalanche.evaluation.functional.forgetting(R)`` (which reports 0, not ``None``, for the last task).
    """
    T = _square_size(R)
    if T == 0:
        return []
    return [R[j][j] - R[T - 1][j] for j in range(T - 1)] + [None]


def forgetting_max(R: Matrix) -> list[float | None]:
    """Mammoth's forgetting per task: best score ever (``max_{i >= j} R[i][j]``) minus final; ``None`` for the last.

    As in Mammoth's ``utils/metrics.py:forgetting`` the maximum includes the final row, so the value is never
    negative. Chaudhry et al. (2018) take the maximum over ``i in [j, T-2]`` only, which can be negative; Mammoth's
    value is ``max(that, 0)``.
    """
    T = _square_size(R)
    if T == 0:
        return []
    return [max(R[i][j] for i in range(j, T)) - R[T - 1][j] for j in range(T - 1)] + [None]


def bwt(R: Matrix) -> float | None:
    """Backward transfer: mean over ``j < T-1`` of ``R[T-1][j] - R[j][j]`` (= minus the mean of ``forgetting``).

    Same as Mammoth's ``backward_transfer`` and Avalanche's ``StreamBWT`` after the last experience.
    ``None`` with fewer than two tasks, where no earlier task exists.
    """
    T = _square_size(R)
    if T < 2:
        return None
    return sum(R[T - 1][j] - R[j][j] for j in range(T - 1)) / (T - 1)


def fwt(R: Matrix, random_init: Sequence[float | None]) -> float | None:
    """Forward transfer as GEM defines it (Lopez-Paz & Ranzato 2017): mean over ``j >= 1`` of ``R[j-1][j] - b[j]``,
    the score of task ``j`` just before training it minus the score the same randomly initialised model had on it
    (``random_init[j]``). ``None`` with fewer than two tasks or where a needed score is missing."""
    T = _square_size(R)
    gains = [R[j - 1][j] - random_init[j] for j in range(1, T)
             if _defined(R[j - 1][j]) and _defined(random_init[j])]
    return sum(gains) / len(gains) if T >= 2 and len(gains) == T - 1 else None


def average_accuracy(R: Matrix) -> float | None:
    """Mean of the last row: every task's score after the whole stream (``None`` before any row)."""
    if not R:
        return None
    last = [value for value in R[-1] if _defined(value)]
    return sum(last) / len(last) if len(last) == len(R[-1]) else None


def _defined(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def relative_drop(baseline: float | None, final: float | None) -> float | None:
    """``(baseline - final) / baseline``: positive means worse than the baseline; ``None`` where either is missing
    or NaN, or the baseline is 0 (no relative change exists)."""
    if not (_defined(baseline) and _defined(final)) or baseline == 0:
        return None
    return (baseline - final) / baseline


def absolute_drop(baseline: float | None, final: float | None) -> float | None:
    """``baseline - final`` in metric points, reported beside the relative drop because "within 5 %" can mean
    either; ``None`` where either is missing or NaN."""
    return baseline - final if _defined(baseline) and _defined(final) else None


def drop_vs_baseline(final: dict[str, float | None], baseline: dict[str, float | None]) -> dict[str, float | None]:
    """The relative drop of every task of ``final`` (``None`` for a task without a baseline)."""
    return {task: relative_drop(baseline.get(task), value) for task, value in final.items()}
