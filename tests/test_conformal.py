"""Conformal risk control: the false-negative and referral guarantees hold on new exchangeable
images, and on new patients when a patient's images are correlated."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit

from cxrfusion.cli import main
from cxrfusion.errors import CxrError
from cxrfusion.labels import LABELS, NUM_LABELS
from cxrfusion.stats.conformal import (
    CALIBRATION_FILE,
    apply_calibration,
    crc_threshold,
    default_unit,
    fit_calibration,
    load_calibration,
    missed,
    realised_rates,
    save_calibration,
    unit_weights,
)

ALPHA = 0.1
REFERRAL_ALPHA = 0.05
SPLITS = 200
CLUSTERED_SETS = 150


def _simulated(rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
    """Labels, scores that separate them imperfectly, an uncertainty that tracks the hard cases."""
    prevalence = np.linspace(0.05, 0.4, NUM_LABELS)
    y = (rng.random((n, NUM_LABELS)) < prevalence).astype(np.uint8)
    p = np.where(y == 1, rng.beta(4, 2, y.shape), rng.beta(2, 4, y.shape))
    uncertainty = 0.5 - np.abs(p - 0.5).mean(axis=1) + 0.05 * rng.random(n)
    groups = np.arange(n) // 2  # two images per patient
    return y, p, uncertainty, groups


def _clustered(rng: np.random.Generator, n_patients: int) -> tuple[np.ndarray, ...]:
    """Few positive patients (prevalence 0.2 per pathology), 4-10 images each, all positive or
    all negative, logits with an intra-class correlation of 0.9 within a patient."""
    groups = np.repeat(np.arange(n_patients), rng.integers(4, 11, n_patients))
    y = (rng.random((n_patients, NUM_LABELS)) < 0.2)[groups].astype(np.uint8)
    shared = rng.normal(size=(n_patients, NUM_LABELS))[groups]
    p = expit(2.5 * y - 1.5 + np.sqrt(0.9) * shared + np.sqrt(0.1) * rng.normal(size=y.shape))
    uncertainty = 0.5 - np.abs(p - 0.5).mean(axis=1) + 0.05 * rng.random(len(groups))
    return y, p, uncertainty, groups


def _average_rates(y, p, u, groups, rng, unit=None) -> tuple[np.ndarray, float, list]:
    """Mean realised FNR per class and retained miss rate over random patient splits, both
    averaged in the calibration's unit."""
    fnr, kept_missed, fits = [], [], []
    patients = np.unique(groups)
    for _ in range(SPLITS):
        calibration_patients = rng.permutation(patients)[: len(patients) // 2]
        cal = np.isin(groups, calibration_patients)
        fitted = fit_calibration(
            y[cal],
            p[cal],
            u[cal],
            groups[cal],
            ALPHA,
            REFERRAL_ALPHA,
            seed=int(rng.integers(1e9)),
            unit=unit,
        )
        rates = realised_rates(y[~cal], p[~cal], u[~cal], groups[~cal], fitted)
        fnr.append([np.nan if c["fnr"] is None else c["fnr"] for c in rates["classes"].values()])
        kept_missed.append(rates["referral"]["retained_miss_rate"])
        fits.append(fitted)
    return np.nanmean(np.array(fnr), axis=0), float(np.mean(kept_missed)), fits


def test_average_false_negative_rate_over_random_splits_is_at_most_alpha() -> None:
    rng = np.random.default_rng(0)
    y, p, u, groups = _simulated(rng, 1200)  # a patient's two images are independent
    fnr, kept_missed, fits = _average_rates(y, p, u, groups, rng, unit="image")
    assert (fnr <= ALPHA + 0.01).all(), dict(zip(LABELS, fnr.round(3), strict=True))
    assert fnr.mean() > ALPHA - 0.03  # not trivially conservative
    assert kept_missed <= REFERRAL_ALPHA + 0.01
    assert all(any(t > 0.1 for t in fit.thresholds.values()) for fit in fits)
    assert any(fit.referral_threshold is not None for fit in fits)


def _clustered_rates(unit: str) -> np.ndarray:
    """(sets, 2) realised mean FNR over the pathologies and retained miss rate, averaged in the
    unit's way, of calibrations on 100 patients each checked on 100 new ones."""
    rng = np.random.default_rng(5)
    rates = []
    for _ in range(CLUSTERED_SETS):
        y, p, u, groups = _clustered(rng, 200)
        cal = groups < 100
        fitted = fit_calibration(
            y[cal], p[cal], u[cal], groups[cal], ALPHA, REFERRAL_ALPHA, unit=unit
        )
        assert fitted.unit == unit
        found = realised_rates(y[~cal], p[~cal], u[~cal], groups[~cal], fitted)
        fnr = [c["fnr"] for c in found["classes"].values() if c["fnr"] is not None]
        rates.append([np.mean(fnr), found["referral"]["retained_miss_rate"]])
    return np.array(rates)


def test_patient_calibration_keeps_patient_averaged_rates_within_alpha_on_clustered_data() -> None:
    # About 10 positive patients per pathology fit the thresholds, the referral 50 others.
    patient, image = _clustered_rates("patient"), _clustered_rates("image")
    mean, error = patient.mean(axis=0), patient.std(axis=0, ddof=1) / np.sqrt(len(patient))
    beside = f"patient unit {mean} +- {error}, image unit {image.mean(axis=0)}"
    assert mean[0] <= ALPHA + 2 * error[0], beside
    assert mean[1] <= REFERRAL_ALPHA + 2 * error[1], beside
    # The image-level guarantee leaks here (its images are not exchangeable): the case for
    # the patient unit, and what this test would see if the unit were ignored.
    assert image[:, 0].mean() > ALPHA + 4 * error[0], beside


def test_threshold_is_the_order_statistic_of_the_crc_bound() -> None:
    scores = np.arange(1, 20) / 20  # n = 19 positives: alpha (n + 1) - 1 = 1 miss allowed
    assert crc_threshold(scores, ALPHA) == pytest.approx(0.10)
    assert np.sum(scores < 0.10) == 1
    assert crc_threshold(scores[:8], ALPHA) == 0.0  # (0 + 1) / 9 > alpha: only t = 0 is safe


def test_patient_threshold_allows_the_misses_of_one_patient_in_n_plus_one() -> None:
    # 19 patients with two positive images each: (missed share + 1) / 20 <= alpha allows one
    # patient's worth of misses, e.g. the two lowest images of different patients.
    scores = np.arange(1, 39) / 40
    groups = np.arange(38) % 19
    weights = unit_weights(groups, "patient")
    assert weights.sum() == pytest.approx(19)
    assert crc_threshold(scores, ALPHA, weights=weights) == pytest.approx(3 / 40)
    # 16 images would allow a positive threshold, 8 patients of 2 images do not.
    pairs = unit_weights(np.arange(16) % 8, "patient")
    assert crc_threshold(scores[:16], ALPHA) == pytest.approx(1 / 40)
    assert crc_threshold(scores[:16], ALPHA, weights=pairs) == 0.0


def test_the_unit_defaults_to_patient_when_a_patient_has_several_images() -> None:
    y, p, u, groups = _simulated(np.random.default_rng(6), 400)
    assert default_unit(groups) == "patient" and default_unit(np.arange(5)) == "image"
    assert fit_calibration(y, p, u, groups).unit == "patient"
    assert fit_calibration(y, p, u, np.arange(len(y))).unit == "image"
    assert fit_calibration(y, p, u, groups, unit="image").unit == "image"
    with pytest.raises(CxrError, match="--unit 'study'"):
        fit_calibration(y, p, u, groups, unit="study")


def test_realised_fnr_is_averaged_as_the_guarantee_is() -> None:
    # Patient a: 4 positive images, 2 missed; patient b: 1 positive image, caught.
    y = np.zeros((6, NUM_LABELS), dtype=np.uint8)
    y[:5, 0] = 1
    p = np.full(y.shape, 0.9)
    p[:2, 0] = 0.1
    groups = np.array(["a", "a", "a", "a", "b", "b"])
    fitted = fit_calibration(*_simulated(np.random.default_rng(7), 100))
    fitted = dataclasses.replace(fitted, thresholds=dict.fromkeys(LABELS, 0.5))
    for unit, expected in (("patient", (0.5 + 0.0) / 2), ("image", 2 / 5)):
        found = realised_rates(y, p, np.zeros(6), groups, dataclasses.replace(fitted, unit=unit))
        entry = found["classes"][LABELS[0]]
        assert found["unit"] == unit and entry["fnr"] == pytest.approx(expected)
        assert entry["positives"] == 5 and entry["positive_patients"] == 2
        assert entry["false_negatives"] == 2


def test_referral_keeps_images_below_the_threshold_and_refers_the_rest() -> None:
    rng = np.random.default_rng(1)
    y, p, u, groups = _simulated(rng, 600)
    fitted = fit_calibration(y, p, u, groups, ALPHA, REFERRAL_ALPHA)
    positive, referred = apply_calibration(p, u, fitted)
    assert positive.dtype == bool and positive.shape == p.shape
    cut = np.array([fitted.thresholds[label] for label in LABELS])
    assert np.array_equal(positive, p >= cut)
    assert fitted.referral_threshold is not None
    assert np.array_equal(referred, u >= fitted.referral_threshold)
    assert 0 < referred.sum() < len(u)
    assert fitted.n_calibration + fitted.n_referral == len(y)


def test_missed_means_a_true_finding_decided_negative() -> None:
    y = np.array([[1, 0], [1, 1], [0, 0], [0, 1]])
    decisions = np.array([[True, False], [True, False], [False, True], [False, True]])
    assert missed(y, decisions).tolist() == [False, True, False, False]


def test_bad_alpha_is_a_user_error() -> None:
    y, p, u, groups = _simulated(np.random.default_rng(2), 50)
    with pytest.raises(CxrError, match="--alpha 1.5"):
        fit_calibration(y, p, u, groups, alpha=1.5)


def test_calibration_round_trips_and_a_run_without_one_has_none(tmp_path: Path) -> None:
    y, p, u, groups = _simulated(np.random.default_rng(3), 400)
    fitted = fit_calibration(y, p, u, groups, ALPHA, REFERRAL_ALPHA)
    assert load_calibration(tmp_path) is None
    save_calibration(fitted, tmp_path)
    assert load_calibration(tmp_path) == fitted
    (tmp_path / CALIBRATION_FILE).write_text('{"alpha": 0.1}')
    with pytest.raises(CxrError, match="calibration.json: not a calibration file"):
        load_calibration(tmp_path)


@pytest.fixture(scope="module")
def calibrated_run(mc_dropout_run: Path, tmp_path_factory) -> Path:
    """A copy of the phantom run (the shared one stays uncalibrated) with calibration.json."""
    run = tmp_path_factory.mktemp("calibrated") / "run"
    shutil.copytree(mc_dropout_run, run, ignore=shutil.ignore_patterns("last.ckpt", "eval_*"))
    assert main(["calibrate", "--run", str(run), "--mc-samples", "5", "--alpha", "0.2"]) == 0
    return run


def test_calibrate_writes_thresholds_bound_and_referral_into_the_run(calibrated_run: Path) -> None:
    saved = json.loads((calibrated_run / CALIBRATION_FILE).read_text())
    assert saved["alpha"] == 0.2 and saved["method"] == "crc" and saved["bound"] == 1.0
    split = pd.read_csv(calibrated_run / "split.csv")
    patients = split.loc[split["split"] == "val", "Patient ID"]
    assert patients.duplicated().any()  # phantom patients have follow-up images
    assert saved["unit"] == "patient"
    assert set(saved["thresholds"]) == set(LABELS)
    assert saved["n_calibration"] + saved["n_referral"] > 0
    assert any(t > 0 for t in saved["thresholds"].values())


def test_calibrate_unit_option_overrides_the_default(mc_dropout_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(mc_dropout_run, run, ignore=shutil.ignore_patterns("last.ckpt", "eval_*"))
    assert main(["calibrate", "--run", str(run), "--mc-samples", "2", "--unit", "image"]) == 0
    assert json.loads((run / CALIBRATION_FILE).read_text())["unit"] == "image"


def test_phantom_false_negative_rate_over_random_splits_is_at_most_alpha(
    calibrated_run: Path,
) -> None:
    from scipy.special import expit

    from cxrfusion.data.dataset import split_datasets
    from cxrfusion.data.split import read_split
    from cxrfusion.evaluation.predictions import predict_sample_logits
    from cxrfusion.inference.runs import load_run
    from cxrfusion.stats.uncertainty import summarise_samples

    model, config = load_run(calibrated_run)
    datasets = split_datasets(
        Path(config.prepared),
        config.cache_size,
        config.input_size,
        split_file=calibrated_run / "split.csv",
    )
    split = read_split(calibrated_run / "split.csv")
    summary = summarise_samples(
        np.concatenate(
            [expit(predict_sample_logits(model, datasets[s], 5)) for s in ("val", "test")],
            axis=1,
        )
    )
    rows = [split[split["split"] == s] for s in ("val", "test")]
    y = np.concatenate([r[list(LABELS)].to_numpy() for r in rows])
    groups = np.concatenate([r["Patient ID"].to_numpy() for r in rows])
    fnr, kept_missed, _ = _average_rates(
        y, summary["mean"], summary["uncertainty"], groups, np.random.default_rng(4)
    )
    assert np.nanmean(fnr) <= ALPHA + 0.01
    assert kept_missed <= REFERRAL_ALPHA + 0.01


def test_evaluate_reports_the_bound_and_realised_fnr_per_class(
    calibrated_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "eval"
    argv = ["evaluate", "--run", str(calibrated_run), "--out", str(out)]
    assert main([*argv, "--mc-samples", "5", "--bootstrap", "10", "--examples", "1"]) == 0
    conformal = json.loads((out / "metrics.json").read_text())["conformal"]
    predictions = pd.read_csv(out / "predictions.csv")
    saved = load_calibration(calibrated_run)
    assert conformal["unit"] == saved.unit == "patient"
    for label in LABELS:
        entry = conformal["classes"][label]
        truth = predictions[f"true_{label}"] == 1
        assert entry["bound"] == 0.2 and entry["positives"] == truth.sum()
        miss = predictions[label] < saved.thresholds[label]
        assert entry["false_negatives"] == int((truth & miss).sum())
        if truth.any():  # the realised rate is patient-averaged, as the guarantee
            per_patient = miss[truth].groupby(predictions.loc[truth, "Patient ID"]).mean()
            assert entry["fnr"] == pytest.approx(per_patient.mean())
    report = (out / "report.md").read_text()
    assert "Guaranteed decisions (conformal risk control)" in report
    assert "realised FNR (patient-averaged)" in report
