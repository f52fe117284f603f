"""The statistics of a comparison table, against scipy's Wilcoxon test, exact enumeration and simulation."""
import itertools

import numpy as np
import pytest
from scipy import stats

from clmtl.studies.significance import (detection_power, minimum_detectable_difference, paired_test, seeds_to_resolve,
                                         signed_rank_p, t_half_width)


def test_t_half_width_is_the_student_interval():
    values = [0.61, 0.58, 0.66, 0.60]
    expected = 3.1824 * np.std(values, ddof=1) / 2  # t(0.975, 3) = 3.1824 from tables
    assert t_half_width(values) == pytest.approx(expected, rel=1e-4)
    assert t_half_width([0.5]) is None


@pytest.mark.parametrize("differences", [[0.03, -0.01, 0.02, 0.05, 0.04, 0.06], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, -0.7],
                                         [-0.02, 0.011, -0.05, 0.031, -0.004], [0.2, 0.1, 0.3]])
def test_signed_rank_p_equals_scipys_exact_wilcoxon(differences):
    assert signed_rank_p(differences) == pytest.approx(stats.wilcoxon(differences, method="exact").pvalue, abs=1e-12)


def test_signed_rank_p_with_ties_and_zeros_counts_every_sign_pattern():
    differences = [0.1, -0.1, 0.1, 0.2, 0.0, 0.2]  # a zero (dropped) and tied magnitudes
    kept = [0.1, -0.1, 0.1, 0.2, 0.2]
    ranks = stats.rankdata(np.abs(kept))  # mean ranks: 2, 2, 2, 4.5, 4.5
    observed = abs(sum(r for r, d in zip(ranks, kept) if d > 0) - ranks.sum() / 2)
    extremes = sum(abs(sum(r for r, s in zip(ranks, signs) if s) - ranks.sum() / 2) >= observed - 1e-9
                   for signs in itertools.product([0, 1], repeat=len(kept)))
    assert signed_rank_p(differences) == pytest.approx(extremes / 2 ** len(kept))
    assert signed_rank_p([0.0, 0.0]) == 1.0


def test_paired_test_needs_the_same_seeds_and_six_to_reach_five_percent():
    with pytest.raises(ValueError, match="same seeds"):
        paired_test([0.1, 0.2], [0.1])
    better_on_five = paired_test([0.3, 0.5, 0.4, 0.6, 0.7], [0.2, 0.3, 0.35, 0.5, 0.6])
    assert better_on_five.mean == pytest.approx(0.11) and better_on_five.p_value == pytest.approx(2 / 32)
    assert not better_on_five.significant  # 5 seeds cannot reach 5 %
    assert paired_test([0.3, 0.5, 0.4, 0.6, 0.7, 0.8], [0.2, 0.3, 0.35, 0.5, 0.6, 0.7]).significant


def test_detection_power_matches_a_direct_simulation_with_scipy():
    rng = np.random.default_rng(1)
    rejected = [stats.wilcoxon(rng.normal(1.2, 1.0, 8), method="exact").pvalue < 0.05 for _ in range(2000)]
    assert detection_power(1.2, 8) == pytest.approx(np.mean(rejected), abs=0.03)
    assert detection_power(0.0, 8) <= 0.05  # the test's level holds under no difference


def test_minimum_detectable_difference_is_where_the_power_reaches_eighty_percent():
    difference = minimum_detectable_difference(0.04, 8)
    assert detection_power(difference / 0.04, 8) >= 0.8 > detection_power(0.97 * difference / 0.04, 8)
    assert minimum_detectable_difference(0.04, 5) == float("inf")  # the test cannot reach 5 % with 5 seeds
    # at 6 seeds only all-positive differences reject: P(all 6 > 0) = Phi(d / s)^6 = 0.8 gives d = 1.79 s
    assert minimum_detectable_difference(1.0, 6) == pytest.approx(stats.norm.ppf(0.8 ** (1 / 6)), abs=0.05)


def test_seeds_to_resolve_is_the_fewest_that_suffice():
    n = seeds_to_resolve(0.04, 0.05)
    assert minimum_detectable_difference(0.04, n) <= 0.05 < minimum_detectable_difference(0.04, n - 1)
    assert seeds_to_resolve(10.0, 0.001) is None
    assert seeds_to_resolve(0.0, 0.05) == 6 and minimum_detectable_difference(0.0, 6) == 0.0
