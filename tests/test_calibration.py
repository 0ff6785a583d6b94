"""Specifications of ECE, Brier, reliability bins and temperature scaling (what it must achieve)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from scipy.optimize import minimize_scalar
from scipy.special import expit, logit

from cxrfusion.errors import CxrError
from cxrfusion.labels import NUM_LABELS
from cxrfusion.stats.calibration import (
    brier_score,
    expected_calibration_error,
    nll,
    reliability_bins,
)
from cxrfusion.stats.temperature import (
    TEMPERATURE_BOUNDS,
    apply_temperature,
    fit_temperature,
    mean_sample_nll,
    read_temperature,
    write_temperature,
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


def _scaled_simulation(scale: float, seed: int, n: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
    """Outcomes drawn from sigmoid(z) (a calibrated model) with the logits returned as scale * z.

    scale 3 is a deliberately over-confident model, scale 0.3 an under-confident one.
    """
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, size=(n, 3))
    y = (rng.random(z.shape) < expit(z)).astype(np.uint8)
    return scale * z, y


def test_an_over_confident_model_gets_t_near_its_scale_and_a_much_lower_nll() -> None:
    logits, y = _scaled_simulation(3.0, seed=3)
    temperature = fit_temperature(logits, y).values
    np.testing.assert_allclose(temperature, 3.0, rtol=0.05)
    before, after = nll(y, expit(logits)), nll(y, apply_temperature(logits, temperature))
    assert after < before - 0.15  # measured: 0.681 -> 0.461 nats
    assert expected_calibration_error(y, apply_temperature(logits, temperature)) < 0.02


def test_an_under_confident_model_gets_t_below_one() -> None:
    logits, y = _scaled_simulation(0.3, seed=4)
    temperature = fit_temperature(logits, y).values
    np.testing.assert_allclose(temperature, 0.3, rtol=0.05)
    before, after = nll(y, expit(logits)), nll(y, apply_temperature(logits, temperature))
    assert after < before - 0.05  # measured: 0.555 -> 0.461 nats


def test_temperatures_fitted_on_mc_samples_calibrate_the_mc_predictor() -> None:
    # Over-confident dropout samples around a calibrated logit: the predictor is the mean of the
    # samples' sigmoids, and only a temperature fitted on that quantity calibrates it.
    rng = np.random.default_rng(7)
    z = rng.normal(0.0, 2.0, size=(20_000, 2))
    y = (rng.random(z.shape) < expit(z)).astype(np.uint8)
    samples = 3.0 * (z[None] + rng.normal(0.0, 1.5, size=(25, *z.shape)))
    fit, held_out = slice(0, 10_000), slice(10_000, None)
    on_samples = fit_temperature(samples[:, fit], y[fit]).values
    on_deterministic = fit_temperature(3.0 * z[fit], y[fit]).values

    def held_out_ece(temperature: np.ndarray) -> float:
        mean = apply_temperature(samples[:, held_out], temperature).mean(axis=0)
        return expected_calibration_error(y[held_out], mean)

    assert held_out_ece(on_samples) < 0.02  # measured 0.010
    assert held_out_ece(on_samples) < 0.5 * held_out_ece(on_deterministic)  # measured 0.040


def test_mean_sample_nll_is_the_nll_of_the_mean_probability() -> None:
    rng = np.random.default_rng(8)
    logits, y = rng.normal(0, 3, size=(5, 200)), (rng.random(200) < 0.4).astype(np.uint8)
    expected = nll(y, expit(logits / 1.7).mean(axis=0))
    assert mean_sample_nll(logits, y, 1.7) == pytest.approx(expected, rel=1e-9)


def test_a_class_without_positives_or_negatives_takes_the_shared_temperature() -> None:
    logits, y = _scaled_simulation(3.0, seed=5)
    y[:, 0] = 0
    y[:, 2] = 1
    fit = fit_temperature(logits, y)
    assert fit.values[0] == fit.values[2] == fit.shared == pytest.approx(3.0, rel=0.05)
    assert fit.own.tolist() == [False, True, False] and fit.positives[0] == 0


def _with_rare_class(positive_logits: np.ndarray, seed: int, n: int = 2_000):
    """Two calibrated classes (scale 1) and a third whose positives have the given logits and whose
    negatives sit at logits drawn below -1."""
    logits, y = _scaled_simulation(1.0, seed, n)
    rng = np.random.default_rng(seed)
    y[:, 2] = 0
    y[: len(positive_logits), 2] = 1
    logits[:, 2] = rng.uniform(-8.0, -1.0, n)
    logits[: len(positive_logits), 2] = positive_logits
    return logits, y


def test_a_separable_class_stays_near_the_shared_temperature_instead_of_its_bound(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # 25 positives all above every negative: the free fit runs to T = 0.05 (logits x 20).
    logits, y = _with_rare_class(np.linspace(0.0, 3.0, 25), seed=11)
    free = minimize_scalar(
        lambda u: mean_sample_nll(logits[None, :, 2], y[:, 2], np.exp(u)),
        bounds=np.log(TEMPERATURE_BOUNDS), method="bounded",
    )  # fmt: skip
    assert np.exp(free.x) < TEMPERATURE_BOUNDS[0] * 1.01
    with caplog.at_level(logging.WARNING, logger="cxrfusion.stats.temperature"):
        fit = fit_temperature(logits, y)
    assert fit.own[2] and fit.positives[2] == 25
    assert abs(np.log(fit.values[2] / fit.shared)) < 1.5  # a factor of 4.5 at most, not 20
    assert not caplog.records


def test_a_class_with_two_positives_takes_the_shared_temperature() -> None:
    logits, y = _with_rare_class(np.array([4.0, 5.0]), seed=12)
    fit = fit_temperature(logits, y)
    assert not fit.own[2] and fit.positives[2] == 2 and fit.values[2] == fit.shared


def _rare_class_test_nll(
    offset: float, scale: float, n_val: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Test NLL of a rare third class under our fit, the shared T and a free per-class fit, over
    200 validation draws of `n_val` images, each judged on the same 20,000 test images. The rare
    class's logits are `offset + z` reported as `scale` times that (scale 1: calibrated)."""

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        z = rng.normal(0.0, 2.0, size=(n, 3))
        z[:, 2] += offset
        y = (rng.random(z.shape) < expit(z)).astype(np.uint8)
        z[:, 2] *= scale
        return z, y

    test_z, test_y = draw(20_000)
    losses: dict[str, list[float]] = {"fit": [], "shared": [], "free": []}
    for _ in range(200):
        z, y = draw(n_val)
        if not 0 < y[:, 2].sum() < n_val:
            continue
        fit = fit_temperature(z, y)
        free = minimize_scalar(
            lambda u, z=z, y=y: mean_sample_nll(z[None, :, 2], y[:, 2], np.exp(u)),
            bounds=np.log(TEMPERATURE_BOUNDS), method="bounded",
        )  # fmt: skip
        for name, t in (("fit", fit.values[2]), ("shared", fit.shared), ("free", np.exp(free.x))):
            losses[name].append(mean_sample_nll(test_z[None, :, 2], test_y[:, 2], t))
    return {name: np.array(values) for name, values in losses.items()}


def test_a_rare_calibrated_class_loses_nothing_to_the_shared_temperature() -> None:
    """The issue's simulation: a rare class calibrated at T = 1 with a median of 2 positives in
    200 validation images; the free per-class fit often runs to T = 0.05."""
    losses = _rare_class_test_nll(-6.5, 1.0, 200, np.random.default_rng(13))
    assert losses["fit"].mean() <= losses["shared"].mean() + 1e-12
    assert losses["fit"].mean() < losses["free"].mean()


def test_a_rare_over_confident_class_with_enough_positives_gets_its_own_temperature() -> None:
    """About 50 validation positives, logits 2x too large: its own (shrunk) T beats the shared
    one on new images."""
    losses = _rare_class_test_nll(-4.0, 2.0, 800, np.random.default_rng(14))
    gain = losses["shared"] - losses["fit"]
    assert gain.mean() > 3 * gain.std() / np.sqrt(len(gain)), gain.mean()


def test_a_temperature_on_its_bound_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    y = np.tile([[0], [1]], (50, 1)).astype(np.uint8)
    logits = np.where(y == 1, 1.0, -1.0)  # every class separable: nothing holds T back
    with caplog.at_level(logging.WARNING, logger="cxrfusion.stats.temperature"):
        fit = fit_temperature(logits, y)
    assert fit.shared < TEMPERATURE_BOUNDS[0] * 1.01
    assert "sits on its bound" in caplog.text and "fitted on 50 positives" in caplog.text


def test_apply_temperature_one_is_the_sigmoid() -> None:
    logits = np.array([[-3.0, 0.0, 2.0]])
    np.testing.assert_allclose(apply_temperature(logits, np.ones(3)), expit(logits))
    np.testing.assert_allclose(apply_temperature(logits, 2.0), expit(logits / 2))


def test_temperature_file_round_trips_and_a_corrupt_one_is_a_user_error(tmp_path) -> None:
    assert read_temperature(tmp_path) is None
    temperature = np.linspace(0.5, 2.0, NUM_LABELS)
    path = write_temperature(tmp_path, temperature, {"fitted_on": "val"})
    assert path == tmp_path / "temperature.json"
    np.testing.assert_array_equal(read_temperature(tmp_path), temperature)
    path.write_text('{"temperature": {"Atelectasis": 1.0}}')
    with pytest.raises(CxrError, match=r"temperature\.json: not a temperature file"):
        read_temperature(tmp_path)
