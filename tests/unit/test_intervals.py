"""The paired bootstrap interval of a difference between two methods on the same prompts, checked
against a case small enough to work out by hand, and against independent resampling on a case
built so that pairing matters."""

from __future__ import annotations

import numpy as np
import pytest

from ray_align.judges.compare_report import paired_difference

# Per-prompt harmless flags of two methods on four prompts: they agree on prompts 0-2 and differ
# only on prompt 3, so the per-prompt differences are (0, 0, 0, 1).
A = [True, True, False, True]
B = [True, True, False, False]


def test_paired_interval_against_a_hand_computed_case():
    # A paired resample draws 4 prompts with replacement; its difference is k/4 where k, the
    # number of times prompt 3 is drawn, is Binomial(4, 1/4):
    #   P(k=0..4) = (81, 108, 54, 12, 1) / 256, cumulative 0.316, 0.738, 0.949, 0.996, 1.
    # So the 2.5% quantile is 0, the 97.5% is 3/4; the 25% is 0 and the 75% is 2/4.
    # 20000 resamples put every empirical cumulative share many standard errors from a boundary.
    assert paired_difference(A, B, resamples=20_000, seed=3) == (0.25, 0.0, 0.75)
    assert paired_difference(A, B, resamples=20_000, level=0.5, seed=3) == (0.25, 0.0, 0.5)
    # b minus a mirrors it
    assert paired_difference(B, A, resamples=20_000, seed=3) == (-0.25, -0.75, 0.0)


def _independent(a, b, resamples, level, seed):
    """What an unpaired bootstrap would say: each method's prompts resampled on their own."""
    rng = np.random.default_rng(seed)
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    picks_a = rng.integers(0, a.size, (resamples, a.size))
    picks_b = rng.integers(0, b.size, (resamples, b.size))
    diffs = a[picks_a].mean(axis=1) - b[picks_b].mean(axis=1)
    tail = (1 - level) / 2
    return tuple(np.quantile(diffs, [tail, 1 - tail]))


def test_pairing_matters_where_the_methods_agree_prompt_by_prompt():
    # Unpaired, a's mean is Binomial(4, 3/4)/4 and b's Binomial(4, 1/2)/4 independently, so
    # b beats a in more than 8% of resamples and the 2.5% quantile falls below 0; paired, no
    # resample can be negative.
    low, high = _independent(A, B, 20_000, 0.95, 3)
    assert low < 0 and high >= 0.75
    assert paired_difference(A, B, resamples=20_000, seed=3)[1] == 0.0
    # Identical answers: paired, a zero-width interval at 0; unpaired, a wide one.
    same = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0]
    assert paired_difference(same, same) == (0.0, 0.0, 0.0)
    low, high = _independent(same, same, 2000, 0.95, 0)
    assert low < -0.3 and high > 0.3
    # A constant per-prompt gap on varied scores is known exactly when paired.
    assert paired_difference([3, 5, 7, 9, 4], [1, 3, 5, 7, 2]) == (2.0, 2.0, 2.0)


def test_unequal_lengths_are_refused():
    with pytest.raises(ValueError, match="one value of each method per prompt; got 3 values for a and 2"):
        paired_difference([1, 0, 1], [1, 0])


def test_deterministic_for_a_seed_and_fast_for_large_inputs():
    rng = np.random.default_rng(0)
    a = rng.random(1000) < 0.7
    b = a & (rng.random(1000) < 0.9)
    first = paired_difference(a.tolist(), b.tolist(), seed=11)
    assert first == paired_difference(a.tolist(), b.tolist(), seed=11)
    assert first != paired_difference(a.tolist(), b.tolist(), seed=12)
    diff, low, high = first
    assert diff == pytest.approx(a.mean() - b.mean())
    assert 0 < low <= diff <= high  # b only ever loses flags: the gap is clearly above 0
    narrow = paired_difference(a.tolist(), b.tolist(), seed=11, level=0.5)
    assert low < narrow[1] and narrow[2] < high


def test_no_prompts_and_bad_settings():
    assert paired_difference([], []) == (None, None, None)
    with pytest.raises(ValueError, match="confidence"):
        paired_difference([1], [0], level=1.0)
    with pytest.raises(ValueError, match="resamples"):
        paired_difference([1], [0], resamples=0)
