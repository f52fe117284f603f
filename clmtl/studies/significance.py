"""The statistics of a comparison over seeds: confidence intervals, a paired test, and the smallest difference the
seeds can resolve.

- **Confidence interval**: the mean ± Student's t half-width, ``t(0.975, n-1) · s / √n`` (s: sample standard
  deviation over seeds).
- **Paired test**: two strategies trained with the same seeds share each seed's data, initial weights and baselines,
  so they are compared seed by seed, with the exact two-sided **Wilcoxon signed-rank test** of the seeds'
  differences (zero differences dropped, tied magnitudes given their mean rank, the p-value the exact share of the
  2^n sign patterns at least as extreme; the normal approximation beyond 20 seeds). It assumes no distribution, but
  n seeds cannot give a p-value below 2 / 2^n: at the 5 % level it needs at least ``MIN_SEEDS`` (6) seeds. A paired
  bootstrap, the other usual choice, has no such floor because it is too liberal at a few seeds: with 4 seeds every
  difference of one sign on all of them would count as significant, which happens by chance one time in eight.
- **Minimum detectable difference**: the mean paired difference the test detects at level α with probability
  ``power`` when the seeds' differences are normal with standard deviation s_d, found by simulating the test (so it is
  infinite below ``MIN_SEEDS`` seeds); ``seeds_to_resolve`` inverts it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import stats

ALPHA = 0.05
POWER = 0.8
MIN_SEEDS = 6
"""The fewest paired seeds whose exact signed-rank test can reach p < 0.05 (2 / 2^6 = 0.031)."""
EXACT_UP_TO = 20
"""Seeds up to which the p-value is counted over every sign pattern (2^20 of them)."""


def t_half_width(values: Sequence[float], confidence: float = 1 - ALPHA) -> float | None:
    """Half-width of the t confidence interval of the mean (None for fewer than two values)."""
    if len(values) < 2:
        return None
    return float(stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values)))


@dataclass(frozen=True)
class PairedDifference:
    """``a - b`` over the seeds both ran: mean difference, two-sided signed-rank p-value, number of seeds."""

    mean: float
    p_value: float
    seeds: int

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA


def two_sided_tails(doubled_ranks: Sequence[int]) -> np.ndarray:
    """For every value ``k`` of twice the sum of the positive ranks, the probability, with each rank's sign a fair
    coin, of a sum at least as far from the centre as ``k``: the exact null distribution over all 2^n sign patterns,
    counted by subset sums (ranks doubled, so mean ranks of ties are integers)."""
    counts = np.zeros(sum(doubled_ranks) + 1)
    counts[0] = 1
    for rank in doubled_ranks:
        counts[rank:] = counts[rank:] + counts[:-rank].copy()
    probabilities = counts / counts.sum()
    distance = np.abs(np.arange(counts.size) - (counts.size - 1) / 2)
    return np.array([probabilities[distance >= d - 1e-9].sum() for d in distance])


def signed_rank_p(differences: Sequence[float]) -> float:
    """Two-sided p-value of the Wilcoxon signed-rank test of ``differences`` (module docstring)."""
    d = np.asarray([x for x in differences if x != 0], dtype=float)
    if d.size == 0:
        return 1.0
    if d.size > EXACT_UP_TO:
        return float(stats.wilcoxon(d, method="asymptotic").pvalue)
    doubled = np.rint(2 * stats.rankdata(np.abs(d))).astype(int)
    return float(two_sided_tails(tuple(doubled))[doubled[d > 0].sum()])


def paired_test(a: Sequence[float], b: Sequence[float]) -> PairedDifference:
    """``mean(a - b)`` and its signed-rank p-value; ``a[i]`` and ``b[i]`` come from the same seed."""
    if len(a) != len(b) or not a:
        raise ValueError(f"a paired test needs the same seeds on both sides, got {len(a)} and {len(b)} values")
    differences = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return PairedDifference(float(differences.mean()), signed_rank_p(differences), len(differences))


@lru_cache(maxsize=None)
def _untied_tails(seeds: int) -> np.ndarray:
    """``two_sided_tails`` of the ranks 1..seeds (continuous differences have no ties)."""
    return two_sided_tails(tuple(range(2, 2 * seeds + 1, 2)))


def detection_power(effect: float, seeds: int, alpha: float = ALPHA, draws: int = 4000) -> float:
    """The probability that the signed-rank test rejects at ``alpha`` when the ``seeds`` paired differences are
    normal with mean ``effect`` and standard deviation 1 (a fixed simulation, so the same answer every time)."""
    differences = np.random.default_rng(0).normal(effect, 1.0, size=(draws, seeds))
    ranks = stats.rankdata(np.abs(differences), axis=1)
    positive_sums = np.where(differences > 0, ranks, 0).sum(axis=1).astype(int)
    return float(np.mean(_untied_tails(seeds)[2 * positive_sums] < alpha))


def minimum_detectable_difference(sd: float, seeds: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest mean paired difference ``seeds`` seeds detect at level ``alpha`` with probability ``power``, for
    differences of standard deviation ``sd`` (infinite when the test cannot reach ``alpha`` at all)."""
    if seeds < 2 or 2 / 2 ** seeds >= alpha:
        return math.inf
    low, high = 0.0, 20.0  # in units of sd
    if detection_power(high, seeds, alpha) < power:
        return math.inf
    for _ in range(20):  # to 20 / 2^20 of sd
        middle = (low + high) / 2
        low, high = (middle, high) if detection_power(middle, seeds, alpha) < power else (low, middle)
    return high * sd


def seeds_to_resolve(sd: float, difference: float, most: int = 50) -> int | None:
    """The fewest seeds that detect ``difference`` with probability ``POWER`` (None: more than ``most``)."""
    if sd == 0:  # differences that never vary: the fewest seeds the test can reject with
        return MIN_SEEDS
    return next((n for n in range(MIN_SEEDS, most + 1) if detection_power(difference / sd, n) >= POWER), None)
