"""Specifications of ECE, Brier, reliability bins and temperature scaling."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit, logit

from cxrfusion.evaluation.calibration import (
    apply_temperature,
    brier_score,
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability_bins,
)


def _calibrated(n: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and outcomes drawn from exactly those probabilities."""
    rng = np.random.default_rng(seed)
    p = rng.random((n, n_classes))
    return (rng.random(p.shape) < p).astype(np.uint8), p


def test_ece_is_near_zero_for_calibrated_probabilities() -> None:
    y, p = _calibrated(10_000, 4, seed=0)
    assert expected_calibration_error(y, p) < 0.02


def test_ece_is_large_for_overconfident_probabilities() -> None:
    y, p = _calibrated(10_000, 4, seed=1)
    assert expected_calibration_error(y, expit(3 * logit(p))) > 0.1


def test_ece_matches_a_hand_example() -> None:
    # Two bins of 0.5: {0.1, 0.2} with one positive -> |0.5 - 0.15|; {0.8, 0.9} all positive -> 0.15.
    y = np.array([[0], [1], [1], [1]])
    p = np.array([[0.1], [0.2], [0.8], [0.9]])
    assert expected_calibration_error(y, p, n_bins=2) == pytest.approx(0.5 * 0.35 + 0.5 * 0.15)


def test_per_class_ece_is_the_ece_of_each_column() -> None:
    y, p = _calibrated(500, 3, seed=2)
    p[:, 1] = expit(3 * logit(p[:, 1]))
    per_class = expected_calibration_error(y, p, axis=0)
    assert per_class.shape == (3,)
    for c in range(3):
        assert per_class[c] == pytest.approx(expected_calibration_error(y[:, [c]], p[:, [c]]))
    assert per_class[1] == per_class.max()


def test_brier_and_nll_match_hand_values() -> None:
    y = np.array([[1, 0], [0, 1]])
    p = np.array([[0.8, 0.4], [0.5, 1.0]])
    assert brier_score(y, p) == pytest.approx((0.04 + 0.16 + 0.25 + 0.0) / 4)
    np.testing.assert_allclose(brier_score(y, p, axis=0), [(0.04 + 0.25) / 2, 0.16 / 2])
    expected = -(np.log(0.8) + np.log(0.6) + np.log(0.5) + np.log(1 - 1e-7)) / 4
    assert nll(y, p) == pytest.approx(expected)


def test_nll_of_a_confident_mistake_is_large_but_finite() -> None:
    assert 10 < nll(np.array([1]), np.array([0.0])) < 20


def test_reliability_bins_count_every_prediction_and_mark_empty_bins() -> None:
    y = np.array([0, 1, 1, 1])
    p = np.array([0.05, 0.1, 0.95, 1.0])
    bins = reliability_bins(y, p, n_bins=10)
    assert bins["counts"].sum() == 4 and bins["counts"][0] == 1 and bins["counts"][9] == 2
    assert bins["confidence"][9] == pytest.approx(0.975) and bins["frequency"][1] == 1.0
    assert np.isnan(bins["frequency"][5]) and bins["centers"][0] == pytest.approx(0.05)


def test_probabilities_outside_zero_one_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        brier_score(np.array([1, 0]), np.array([1.5, 0.0]))


def _overconfident(scale: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Outcomes drawn from sigmoid(z) with the logits returned as scale * z."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, size=(20_000, 3))
    y = (rng.random(z.shape) < expit(z)).astype(np.uint8)
    return scale * z, y


def test_fit_temperature_recovers_the_scale_of_overconfident_logits() -> None:
    logits, y = _overconfident(3.0, seed=3)
    np.testing.assert_allclose(fit_temperature(logits, y), 3.0, rtol=0.10)


def test_fit_temperature_never_worsens_nll_on_its_own_data() -> None:
    for scale in (0.3, 1.0, 3.0):
        logits, y = _overconfident(scale, seed=4)
        temperature = fit_temperature(logits, y)
        fitted = nll(y, apply_temperature(logits, temperature), axis=0)
        assert (fitted <= nll(y, expit(logits), axis=0) + 1e-12).all()


def test_fit_temperature_is_one_for_single_class_columns() -> None:
    logits, y = _overconfident(3.0, seed=5)
    y[:, 0] = 0
    y[:, 2] = 1
    temperature = fit_temperature(logits, y)
    assert temperature[0] == 1.0 and temperature[2] == 1.0 and temperature[1] > 2


def test_apply_temperature_one_is_the_sigmoid() -> None:
    logits = np.array([[-3.0, 0.0, 2.0]])
    np.testing.assert_allclose(apply_temperature(logits, np.ones(3)), expit(logits))
    np.testing.assert_allclose(apply_temperature(logits, 2.0), expit(logits / 2))
