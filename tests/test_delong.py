"""Specifications of DeLong's paired AUC test and Holm's correction, checked independently."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cxrfusion.stats.delong import (
    clustered_delong_test,
    delong_covariance,
    delong_test,
    holm,
)
from cxrfusion.stats.metrics import paired_bootstrap_auc_difference, per_class_auc


def _delong_by_definition(y: list[int], a: list[float], b: list[float]) -> tuple[float, ...]:
    """DeLong (1988) from its definition: every positive against every negative, plain python."""

    def psi(x: float, z: float) -> float:
        return 1.0 if x > z else 0.5 if x == z else 0.0

    pos = [i for i, label in enumerate(y) if label]
    neg = [i for i, label in enumerate(y) if not label]
    m, n = len(pos), len(neg)

    def components(s: list[float]) -> tuple[list[float], list[float]]:
        v10 = [sum(psi(s[i], s[j]) for j in neg) / n for i in pos]
        v01 = [sum(psi(s[i], s[j]) for i in pos) / m for j in neg]
        return v10, v01

    (a10, a01), (b10, b01) = components(a), components(b)
    auc_a, auc_b = sum(a10) / m, sum(b10) / m

    def cov(u: list[float], v: list[float]) -> float:
        mu, mv = sum(u) / len(u), sum(v) / len(v)
        return sum((x - mu) * (z - mv) for x, z in zip(u, v, strict=True)) / (len(u) - 1)

    s10 = cov(a10, a10) + cov(b10, b10) - 2 * cov(a10, b10)
    s01 = cov(a01, a01) + cov(b01, b01) - 2 * cov(a01, b01)
    z = (auc_a - auc_b) / math.sqrt(s10 / m + s01 / n)
    return auc_a, auc_b, math.erfc(abs(z) / math.sqrt(2))


def test_small_example_matches_the_hand_computation() -> None:
    y = [1, 1, 1, 0, 0, 0]
    a = [0.9, 0.8, 0.4, 0.5, 0.3, 0.1]
    b = [0.7, 0.6, 0.3, 0.6, 0.2, 0.3]
    # By hand: a wins 3 + 3 + 2 of 9 pairs -> 8/9; b wins 3 + 2.5 + 1.5 -> 7/9.
    # V10_a = (1, 1, 2/3), V10_b = (1, 5/6, 1/2); differences (0, 1/6, 1/6), var 1/108.
    # V01_a = (2/3, 1, 1), V01_b = (1/2, 1, 5/6); differences (1/6, 0, 1/6), var 1/108.
    # var(AUC_a - AUC_b) = (1/108) / 3 + (1/108) / 3 = 1/162; z = (1/9) * sqrt(162) = sqrt(2).
    auc_a, auc_b, p = delong_test(np.array(y), np.array(a), np.array(b))
    assert auc_a == pytest.approx(8 / 9) and auc_b == pytest.approx(7 / 9)
    assert p == pytest.approx(math.erfc(1.0), rel=1e-12)
    assert (auc_a, auc_b, p) == pytest.approx(_delong_by_definition(y, a, b), rel=1e-12)


def test_agrees_with_the_pairwise_definition_on_random_data_with_ties() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(60) < 0.4).astype(int)
    a = np.round(rng.random(60) + 0.5 * y, 1)
    b = np.round(rng.random(60) + 0.3 * y + 0.3 * a, 1)
    expected = _delong_by_definition(y.tolist(), a.tolist(), b.tolist())
    assert delong_test(y, a, b) == pytest.approx(expected, rel=1e-10)


def _correlated(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = (rng.random(n) < 0.3).astype(int)
    latent = rng.normal(size=n) + 1.0 * y
    return y, latent + 0.5 * rng.normal(size=n), latent + 1.2 * rng.normal(size=n)


def test_standard_error_agrees_with_a_paired_bootstrap() -> None:
    rng = np.random.default_rng(1)
    y, a, b = _correlated(600, rng)
    _, cov = delong_covariance(y, a, b)
    delong_se = math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    both = np.column_stack([a, b])
    labels = np.column_stack([y, y])
    differences = []
    for _ in range(2000):
        weights = np.bincount(rng.integers(0, len(y), len(y)), minlength=len(y))
        aucs = per_class_auc(labels, both, weights)
        differences.append(aucs[0] - aucs[1])
    assert delong_se == pytest.approx(np.std(differences, ddof=1), rel=0.10)


def test_rejects_about_five_percent_of_true_null_hypotheses() -> None:
    rng = np.random.default_rng(2)
    p_values = []
    for _ in range(400):
        y = (rng.random(200) < 0.3).astype(int)
        score = rng.normal(size=200) + y
        p_values.append(
            delong_test(y, score + rng.normal(size=200), score + rng.normal(size=200))[2]
        )
    p_values = np.array(p_values)
    assert 0.02 <= np.mean(p_values < 0.05) <= 0.08
    assert 0.4 <= np.median(p_values) <= 0.6


def test_identical_predictions_give_p_one() -> None:
    y, a, _ = _correlated(100, np.random.default_rng(3))
    assert delong_test(y, a, a)[2] == 1.0
    assert delong_test(y, a, 2 * a + 1)[2] == 1.0  # same ranking, same AUC


def test_no_positives_give_nan() -> None:
    auc_a, auc_b, p = delong_test(np.zeros(10), np.arange(10.0), np.arange(10.0)[::-1])
    assert math.isnan(auc_a) and math.isnan(auc_b) and math.isnan(p)


def test_holm_matches_a_hand_example() -> None:
    # Sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> 0.06 (monotone).
    adjusted = holm(np.array([0.01, np.nan, 0.04, 0.03, 0.005]))
    np.testing.assert_allclose(adjusted, [0.03, np.nan, 0.06, 0.06, 0.02], equal_nan=True)


def test_holm_caps_at_one() -> None:
    np.testing.assert_allclose(holm(np.array([0.6, 0.5])), [1.0, 1.0])


def _clustered(
    n_patients: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Phantom-like test data: 1-6 images per patient sharing the patient's findings and look.

    A patient's images repeat their label with probability 0.85 (follow-ups), and both models'
    scores share a patient effect, so images of a patient are strongly correlated.
    """
    sizes = rng.integers(1, 7, n_patients)
    groups = np.repeat(np.arange(n_patients), sizes)
    sick = rng.random(n_patients) < 0.3
    y = np.where(rng.random(len(groups)) < 0.85, sick[groups], ~sick[groups]).astype(int)
    patient_effect = rng.normal(0, 1.0, n_patients)[groups]
    latent = patient_effect + 1.2 * y
    a = latent + 0.4 * rng.normal(size=len(y)) + 0.5 * rng.normal(0, 1, n_patients)[groups]
    b = latent + 0.9 * rng.normal(size=len(y)) - 0.5 * rng.normal(0, 1, n_patients)[groups]
    return y, a, b, groups


def _naive_se(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    _, cov = delong_covariance(y, a, b)
    return math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])


def test_clustered_delong_equals_delong_with_one_image_per_patient() -> None:
    y, a, b = _correlated(300, np.random.default_rng(4))
    clustered = clustered_delong_test(y, a, b, np.arange(300))
    auc_a, auc_b, p_value = delong_test(y, a, b)
    assert (clustered["auc_a"], clustered["auc_b"]) == (auc_a, auc_b)
    assert clustered["p_value"] == pytest.approx(p_value, rel=1e-10)
    assert clustered["se"] == pytest.approx(_naive_se(y, a, b), rel=1e-10)


def test_clustered_delong_agrees_with_a_paired_patient_bootstrap() -> None:
    y, a, b, groups = _clustered(400, np.random.default_rng(5))
    boot = paired_bootstrap_auc_difference(y, a, b, groups, n_resamples=2000, seed=0)
    clustered = clustered_delong_test(y, a, b, groups)
    assert boot["n_valid"] == 2000
    assert boot["difference"] == pytest.approx(clustered["difference"], rel=1e-12)
    assert clustered["se"] == pytest.approx(boot["se"], rel=0.15)
    assert abs(clustered["p_value"] - boot["p_value"]) < 0.1
    # Ignoring the patients understates the uncertainty on such data.
    assert _naive_se(y, a, b) < 0.85 * clustered["se"]


def test_clustered_delong_keeps_its_size_where_plain_delong_does_not() -> None:
    rng = np.random.default_rng(6)
    clustered, plain = [], []
    for _ in range(400):
        y, a, _, groups = _clustered(80, rng)
        # Equally good models, each with its own per-patient error: the null hypothesis holds,
        # and the images of a patient move the AUC difference together.
        n_patients = groups.max() + 1
        b = a + 0.6 * rng.normal(size=n_patients)[groups]
        a = a + 0.6 * rng.normal(size=n_patients)[groups]
        clustered.append(clustered_delong_test(y, a, b, groups)["p_value"])
        plain.append(delong_test(y, a, b)[2])
    assert 0.02 <= np.mean(np.array(clustered) < 0.05) <= 0.08
    assert np.mean(np.array(plain) < 0.05) > 0.12  # measured 0.195: images taken as independent
