"""Specifications of the referral curve (AUC on the retained images as uncertain ones are referred)."""

from __future__ import annotations

import numpy as np
import pytest

from cxrfusion.stats.metrics import macro_auc, per_class_auc
from cxrfusion.stats.referral import referral_curve


def _cases(n: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, scores that are right on most images, and a mask of the images ranked wrongly."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, n_classes)) < 0.3).astype(np.uint8)
    p = np.clip(0.3 + 0.4 * y + rng.normal(0, 0.1, (n, n_classes)), 0, 1)
    wrong = rng.random(n) < 0.3
    p[wrong] = 1.0 - p[wrong]
    return y, p, wrong


def test_fraction_zero_is_the_full_set_macro_auc_exactly() -> None:
    y, p, _ = _cases(300, 14, seed=0)
    curve = referral_curve(y, p, np.random.default_rng(1).random(300))
    assert curve["macro_auc"][0] == macro_auc(per_class_auc(y, p))
    assert curve["n_retained"][0] == 300


def test_uncertainty_on_the_wrong_cases_raises_the_retained_auc() -> None:
    y, p, wrong = _cases(1000, 14, seed=2)
    uncertainty = wrong + np.random.default_rng(3).normal(0, 0.2, len(y))
    curve = referral_curve(y, p, uncertainty)
    aucs = np.array(curve["macro_auc"])
    assert np.all(np.diff(aucs) > -0.01)
    assert aucs[-1] > aucs[0] + 0.2


def test_random_uncertainty_leaves_the_auc_flat() -> None:
    y, p, _ = _cases(2000, 14, seed=4)
    curve = referral_curve(y, p, np.random.default_rng(5).random(len(y)))
    assert np.ptp(curve["macro_auc"]) < 0.03


def test_default_fractions_refer_up_to_half_of_the_images() -> None:
    y, p, _ = _cases(95, 3, seed=6)
    curve = referral_curve(y, p, np.zeros(95))
    assert curve["fraction_referred"] == pytest.approx(np.linspace(0, 0.5, 11))
    # floor(fraction * N) images referred: 10 % of 95 is 9, 50 % is 47.
    assert curve["n_retained"][2] == 86 and curve["n_retained"][-1] == 48
    assert len(curve["macro_auc"]) == 11


def test_ties_in_uncertainty_are_referred_in_input_order() -> None:
    y, p, _ = _cases(200, 4, seed=7)
    curve = referral_curve(y, p, np.zeros(200), fractions=np.array([0.25]))
    expected = macro_auc(per_class_auc(y[50:], p[50:]))
    assert curve["macro_auc"] == [expected]


def test_most_uncertain_images_are_referred_first() -> None:
    y, p, _ = _cases(200, 4, seed=8)
    uncertainty = np.arange(200.0)
    curve = referral_curve(y, p, uncertainty, fractions=np.array([0.1]))
    assert curve["macro_auc"] == [macro_auc(per_class_auc(y[:180], p[:180]))]


@pytest.mark.parametrize("fractions", [np.array([1.0]), np.array([-0.1]), np.array([[0.1]])])
def test_fractions_outside_zero_to_one_are_rejected(fractions: np.ndarray) -> None:
    y, p, _ = _cases(50, 2, seed=9)
    with pytest.raises(ValueError, match="fractions"):
        referral_curve(y, p, np.zeros(50), fractions=fractions)


def test_uncertainty_of_another_length_is_rejected() -> None:
    y, p, _ = _cases(50, 2, seed=10)
    with pytest.raises(ValueError, match="uncertainty"):
        referral_curve(y, p, np.zeros(49))
