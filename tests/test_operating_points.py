"""Operating points are the thresholds an exhaustive search over every score would choose."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from cxrfusion.stats.operating_points import TARGET_SENSITIVITY, choose_thresholds

SETS = 2000


def _brute_force(y: np.ndarray, p: np.ndarray, target: float) -> dict[str, float]:
    """Each distinct score as a threshold, counted case by case; ties go to the highest threshold."""
    y = y.astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    youden, sensitivity, best = None, None, None
    for t in sorted(set(p.tolist()), reverse=True):
        tp, fp = int((p[y] >= t).sum()), int((p[~y] >= t).sum())
        j = tp * n_neg - fp * n_pos  # Youden's J times n_pos * n_neg, exact
        if best is None or j > best:
            youden, best = t, j
        if sensitivity is None and Fraction(tp, n_pos) >= Fraction(str(target)):
            sensitivity = t
    return {"youden": youden, "sensitivity": sensitivity}


def _random_set(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A small set with both classes, scores on a coarse grid (ties) and labels sorted
    by score, with some noise, so positives come in runs."""
    n = int(rng.integers(4, 40))
    p = rng.integers(0, int(rng.integers(3, 25)), n) / 24
    noise = rng.random() * rng.normal(size=n)
    y = (np.argsort(np.argsort(p + noise)) >= rng.integers(1, n)).astype(np.uint8)
    return y, p


def test_operating_points_equal_an_exhaustive_search_with_runs_of_positives_and_ties() -> None:
    rng = np.random.default_rng(0)
    mismatches = []
    for _ in range(SETS):
        y, p = _random_set(rng)
        for target in (TARGET_SENSITIVITY, 0.8):
            expected = _brute_force(y, p, target)
            if choose_thresholds(y, p, target) != expected:
                mismatches.append((y.tolist(), p.tolist(), target))
    assert not mismatches, f"{len(mismatches)} of {2 * SETS}, first: {mismatches[0]}"


def test_ninety_percent_point_is_inside_a_run_of_positives() -> None:
    # 10 positives at 0.55, 0.60, ..., 1.0 above 10 negatives: 9 of them are >= 0.60. An ROC
    # curve reduced to its corners keeps only 1.0 and 0.55 of this vertical run.
    y = np.array([1] * 10 + [0] * 10)
    p = np.array([*np.linspace(0.55, 1.0, 10), *np.linspace(0.0, 0.45, 10)])
    assert choose_thresholds(y, p)["sensitivity"] == pytest.approx(0.60)


def test_youden_ties_go_to_the_highest_threshold_whatever_the_rounding() -> None:
    # 3 positives, 3 negatives: 0.8 gives tp 2, fp 0 and 0.6 gives tp 3, fp 1, both J = 2/3;
    # in floating point 2/3 - 0 < 1 - 1/3, which would pick 0.6.
    y = np.array([1, 1, 0, 1, 0, 0])
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    assert choose_thresholds(y, p)["youden"] == 0.8
