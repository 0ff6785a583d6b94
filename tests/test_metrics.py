"""Specifications of per-class AUC, macro AUC and the patient bootstrap."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from cxrfusion.labels import LABELS, NUM_LABELS
from cxrfusion.stats.metrics import (
    auc_summary,
    bootstrap_auc_ci,
    macro_auc,
    per_class_auc,
    per_class_average_precision,
    roc_curve_points,
)
from cxrfusion.stats.operating_points import choose_thresholds, operating_points
from cxrfusion.stats.subgroups import age_band, subgroup_aucs


def _scores(n: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and informative scores rounded to one decimal, so that ties are frequent."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, n_classes)) < 0.3).astype(np.uint8)
    return y, np.round(rng.random((n, n_classes)) * 0.8 + 0.2 * y, 1)


def test_per_class_auc_equals_sklearn_with_ties() -> None:
    y, p = _scores(400, 6, seed=1)
    expected = [roc_auc_score(y[:, c], p[:, c]) for c in range(6)]
    np.testing.assert_allclose(per_class_auc(y, p), expected, rtol=0, atol=1e-9)


def test_weighted_auc_equals_auc_of_the_repeated_images() -> None:
    y, p = _scores(300, 4, seed=2)
    weights = np.random.default_rng(3).integers(0, 4, len(y))
    repeated = np.repeat(np.arange(len(y)), weights)
    expected = [roc_auc_score(y[repeated, c], p[repeated, c]) for c in range(4)]
    np.testing.assert_allclose(per_class_auc(y, p, weights), expected, rtol=0, atol=1e-9)


def test_class_without_positives_is_nan_and_never_lowers_the_macro() -> None:
    y, p = _scores(200, 3, seed=4)
    y[:, 1] = 0
    aucs = per_class_auc(y, p)
    assert np.isnan(aucs[1])
    assert macro_auc(aucs) == pytest.approx(np.mean(aucs[[0, 2]]))


def test_class_without_negatives_is_nan() -> None:
    y, p = _scores(50, 2, seed=5)
    y[:, 0] = 1
    assert np.isnan(per_class_auc(y, p)[0])


def test_macro_auc_of_no_defined_class_is_nan() -> None:
    assert np.isnan(macro_auc(np.array([np.nan, np.nan])))


def test_mismatched_or_non_binary_inputs_are_rejected() -> None:
    y, p = _scores(20, 2, seed=6)
    with pytest.raises(ValueError, match="shape"):
        per_class_auc(y, p[:, :1])
    with pytest.raises(ValueError, match="0 and 1"):
        per_class_auc(y * 2, p)


def _patients(n_patients: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image per patient, two classes with a moderate AUC."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n_patients, 2)) < 0.4).astype(np.uint8)
    p = rng.random((n_patients, 2)) + 0.4 * y
    return y, p, np.arange(n_patients)


def test_bootstrap_ci_contains_the_point_estimate_and_is_seeded() -> None:
    y, p, groups = _patients(300, seed=7)
    first = bootstrap_auc_ci(y, p, groups, n_resamples=200, seed=11)
    again = bootstrap_auc_ci(y, p, groups, n_resamples=200, seed=11)
    other = bootstrap_auc_ci(y, p, groups, n_resamples=200, seed=12)
    assert (first["ci_low"] < first["auc"]).all() and (first["auc"] < first["ci_high"]).all()
    assert first["macro_ci_low"] < first["macro_auc"] < first["macro_ci_high"]
    np.testing.assert_array_equal(first["ci_low"], again["ci_low"])
    np.testing.assert_array_equal(first["ci_high"], again["ci_high"])
    assert not np.array_equal(first["ci_low"], other["ci_low"])


def test_bootstrap_resamples_patients_not_images() -> None:
    # Ten copies of each patient's image carry no new information: a patient bootstrap must give
    # exactly the interval of the single images, while an image bootstrap shrinks it ~sqrt(10)x.
    y, p, groups = _patients(300, seed=8)
    copies = np.repeat(np.arange(len(y)), 10)
    single = bootstrap_auc_ci(y, p, groups, n_resamples=300, seed=0)
    by_patient = bootstrap_auc_ci(y[copies], p[copies], groups[copies], n_resamples=300, seed=0)
    by_image = bootstrap_auc_ci(y[copies], p[copies], np.arange(len(copies)), n_resamples=300)

    def width(ci: dict) -> np.ndarray:
        return ci["ci_high"] - ci["ci_low"]

    np.testing.assert_allclose(width(by_patient), width(single), rtol=1e-9)
    assert (width(by_image) < 0.5 * width(by_patient)).all()


def test_bootstrap_skips_resamples_where_a_class_lacks_positives() -> None:
    y, p, groups = _patients(60, seed=9)
    y[:, 1] = 0
    y[0, 1] = 1  # one positive patient: absent from ~37 % of resamples
    ci = bootstrap_auc_ci(y, p, groups, n_resamples=200, seed=0)
    assert 0 < ci["n_valid"][1] < 200 and ci["n_valid"][0] == 200
    assert np.isfinite([ci["ci_low"][1], ci["ci_high"][1]]).all()
    assert ci["macro_n_valid"] == ci["n_valid"][1]


def test_summary_is_json_without_nan_and_counts_cases() -> None:
    rng = np.random.default_rng(10)
    y = (rng.random((120, NUM_LABELS)) < 0.3).astype(np.uint8)
    y[:, LABELS.index("Hernia")] = 0
    p = rng.random(y.shape)
    groups = rng.integers(0, 40, len(y))
    summary = auc_summary(y, p, groups, n_resamples=50)
    text = json.dumps(summary, allow_nan=False)
    hernia = json.loads(text)["classes"]["Hernia"]
    assert hernia == {
        "auc": None,
        "ci_low": None,
        "ci_high": None,
        "n_valid": 0,
        "positives": 0,
        "negatives": 120,
    }
    assert summary["macro"]["n_valid"] == 50  # every resample of 40 patients keeps both sides
    assert summary["n_images"] == 120 and summary["n_patients"] == len(np.unique(groups))
    assert list(summary["classes"]) == list(LABELS)


def test_roc_curve_points_are_none_for_an_undefined_class() -> None:
    y, p = _scores(100, 2, seed=13)
    y[:, 1] = 0
    curves = roc_curve_points(y, p)
    fpr, tpr = curves[0]
    assert fpr[0] == 0 and tpr[-1] == 1 and curves[1] is None


def test_macro_ci_reports_how_many_resamples_were_valid() -> None:
    y, p, groups = _patients(60, seed=9)
    y = np.column_stack([y, np.zeros(len(y), dtype=y.dtype)])
    p = np.column_stack([p, p[:, 0]])
    y[0, -1] = 1  # one positive patient: its class is lost from ~37 % of resamples
    labels = [f"c{c}" for c in range(y.shape[1])]
    summary = auc_summary(y, p, groups, labels=labels, n_resamples=200, seed=0)
    n_valid = summary["macro"]["n_valid"]
    assert 0 < n_valid < 200 and n_valid == summary["classes"][labels[-1]]["n_valid"]


def test_average_precision_equals_sklearn_and_is_nan_without_positives() -> None:
    y, p = _scores(300, 3, seed=14)
    y[:, 2] = 0
    ap = per_class_average_precision(y, p)
    for c in range(2):
        assert ap[c] == pytest.approx(average_precision_score(y[:, c], p[:, c]))
    assert np.isnan(ap[2])


def test_average_precision_of_random_scores_is_near_the_prevalence() -> None:
    rng = np.random.default_rng(15)
    y = (rng.random((20_000, 1)) < 0.1).astype(np.uint8)
    assert per_class_average_precision(y, rng.random(y.shape))[0] == pytest.approx(0.1, abs=0.02)


def test_thresholds_come_from_validation_youden_and_ninety_percent_sensitivity() -> None:
    # Positives at 0.4, 0.6, 0.7, 0.8, 0.9 ... negatives below: Youden cuts at 0.6 (tpr 0.9
    # with no false positive), the 90 % rule takes the highest threshold reaching tpr 0.9.
    y = np.array([1] * 10 + [0] * 10)
    p = np.array([0.4, *np.linspace(0.6, 0.95, 9), *np.linspace(0.0, 0.5, 10)])
    chosen = choose_thresholds(y, p)
    assert chosen["youden"] == pytest.approx(0.6)
    assert chosen["sensitivity"] == pytest.approx(0.6)
    assert choose_thresholds(y, p, target_sensitivity=1.0)["sensitivity"] == pytest.approx(0.4)
    assert np.isnan(choose_thresholds(np.zeros(5), np.arange(5.0))["youden"])


def test_operating_points_apply_validation_thresholds_unchanged_to_the_evaluated_split() -> None:
    y_val, p_val = _scores(400, 2, seed=16)
    y, p = _scores(300, 2, seed=17)
    points = operating_points(y_val, p_val, y, p, labels=["a", "b"])
    for c, label in enumerate(["a", "b"]):
        point = points["classes"][label]["sensitivity_target"]
        assert point["threshold"] == choose_thresholds(y_val[:, c], p_val[:, c])["sensitivity"]
        assert point["val_sensitivity"] >= 0.9
        called = p[:, c] >= point["threshold"]
        assert point["sensitivity"] == pytest.approx(called[y[:, c] == 1].mean())
        assert point["specificity"] == pytest.approx((~called[y[:, c] == 0]).mean())
    json.dumps(points, allow_nan=False)


def test_age_bands_read_nih_ages_and_leave_impossible_ones_unknown() -> None:
    ages = pd.Series(["39", "058Y", "60", "79", "80", "413", "", "x"])
    bands = age_band(ages)
    assert bands.iloc[:5].tolist() == ["<40", "40-59", "60-79", "60-79", "80+"]
    assert bands.iloc[5:].isna().all()


def test_subgroup_auc_is_the_auc_of_the_subgroup_alone() -> None:
    y, p = _scores(400, NUM_LABELS, seed=18)
    rng = np.random.default_rng(19)
    rows = pd.DataFrame(
        {
            "Patient ID": np.arange(400) // 2,
            "Patient Gender": rng.choice(["M", "F"], 400),
            "Patient Age": rng.integers(20, 95, 400).astype(str),
            "View Position": rng.choice(["PA", "AP"], 400),
        }
    )
    result = subgroup_aucs(rows, y, p)
    assert list(result) == ["sex", "age", "view"] and list(result["view"]) == ["AP", "PA"]
    women = (rows["Patient Gender"] == "F").to_numpy()
    expected = per_class_auc(y[women], p[women])
    got = result["sex"]["F"]["auc"]
    np.testing.assert_allclose([got[label] for label in LABELS], expected)
    assert result["sex"]["F"]["images"] + result["sex"]["M"]["images"] == 400
    assert sum(g["images"] for g in result["age"].values()) == 400
    assert subgroup_aucs(rows[["Patient ID"]], y, p) == {}
