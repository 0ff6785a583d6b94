"""External validation: a run's internal test results beside another data set's, every figure
recomputable from the two predictions.csv files, and a warning when "external" is not."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pandas as pd
import pytest
from source_layouts import write_chexpert

from cxrfusion.cli import main
from cxrfusion.data.options import PrepareOptions
from cxrfusion.data.prepare import prepare
from cxrfusion.labels import LABELS
from cxrfusion.stats.calibration import expected_calibration_error
from cxrfusion.stats.metrics import (
    bootstrap_auc_ci,
    per_class_auc,
    unpaired_bootstrap_auc_difference,
)
from cxrfusion.stats.operating_points import sensitivity_specificity

SIZE = 64  # the shared run's cache size
FAST = ["--mc-samples", "2", "--bootstrap", "50"]


def _scored_set(rng: np.random.Generator, n: int, signal: float) -> tuple[np.ndarray, ...]:
    y = (rng.random((n, 3)) < 0.3).astype(float)
    p = rng.random((n, 3)) + signal * y
    return y, p, np.arange(n) // 2


def test_unpaired_difference_resamples_each_set_on_its_own():
    rng = np.random.default_rng(0)
    a, b = _scored_set(rng, 400, 0.8), _scored_set(rng, 300, 0.3)
    b[0][:, 2] = 0.0  # a finding without positives in B: not compared, never 0
    result = unpaired_bootstrap_auc_difference(a, b, n_resamples=400, seed=3)
    auc_a, auc_b = per_class_auc(a[0], a[1]), per_class_auc(b[0], b[1])
    np.testing.assert_allclose(result["difference"][:2], (auc_b - auc_a)[:2], atol=1e-12)
    assert np.isnan(result["difference"][2]) and not result["in_macro"][2]
    assert result["macro_difference"] == pytest.approx((auc_b - auc_a)[:2].mean())
    # Set A's intervals are evaluate's (same seed); the difference's width adds both variances.
    alone = bootstrap_auc_ci(*a, n_resamples=400, seed=3)
    np.testing.assert_allclose(result["ci_low_a"], alone["ci_low"])
    width = result["ci_high"] - result["ci_low"]
    expected = np.hypot(
        result["ci_high_a"] - result["ci_low_a"], result["ci_high_b"] - result["ci_low_b"]
    )
    np.testing.assert_allclose(width[:2], expected[:2], rtol=0.2)
    assert (result["ci_low"][:2] < result["difference"][:2]).all()
    assert (result["difference"][:2] < result["ci_high"][:2]).all()
    # Valid resamples: the compared findings' on both sides, the macro's where all are defined.
    assert result["n_valid"][2] == 0 and (result["n_valid"][:2] <= 400).all()
    assert result["macro_n_valid"] <= result["n_valid"][:2].min()


@pytest.fixture(scope="module")
def run_and_external(mc_dropout_run, tmp_path_factory):
    """A copy of the shared run and a CheXpert-layout data set prepared at its cache size."""
    root = tmp_path_factory.mktemp("external")
    run = shutil.copytree(mc_dropout_run, root / "run", ignore=shutil.ignore_patterns("eval_*"))
    external = root / "chexpert_prepared"
    source = write_chexpert(root / "raw", patients=40)
    prepare(f"chexpert:{source}", external, PrepareOptions(patient_fraction=1.0, size=SIZE))
    return run, external


def _predictions(folder) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    frame = pd.read_csv(folder / "predictions.csv", float_precision="round_trip")
    y = frame[[f"true_{label}" for label in LABELS]].to_numpy(float)
    return y, frame[list(LABELS)].to_numpy(float), frame


def test_external_report_is_recomputable_from_both_prediction_files(run_and_external, capsys):
    run, external = run_and_external
    argv = ["external", "--run", str(run), "--prepared", str(external), "--split", "all", *FAST]
    assert main(argv) == 0, capsys.readouterr().err
    out = run / "external_chexpert_prepared_all" / "vs_internal"
    table = pd.read_csv(out / "external.csv", index_col="finding", float_precision="round_trip")
    y_int, p_int, _ = _predictions(run / "eval_test")
    y_ext, p_ext, _ = _predictions(run / "external_chexpert_prepared_all")
    auc_int, auc_ext = per_class_auc(y_int, p_int), per_class_auc(y_ext, p_ext)
    both = [label for c, label in enumerate(LABELS) if np.isfinite(auc_int[c] + auc_ext[c])]
    assert table.index.tolist() == [*both, "Macro"]
    assert "Mass" not in both  # CheXpert has no Mass: not compared
    for label in both:
        c, row = LABELS.index(label), table.loc[label]
        assert row["auc_internal"] == pytest.approx(auc_int[c], abs=1e-12)
        assert row["auc_external"] == pytest.approx(auc_ext[c], abs=1e-12)
        assert row["auc_difference"] == pytest.approx(auc_ext[c] - auc_int[c], abs=1e-12)
        known = ~np.isnan(y_ext[:, c])
        sens, spec = sensitivity_specificity(y_ext[known, c], p_ext[known, c], row["threshold"])
        assert (row["sensitivity_external"], row["specificity_external"]) == (sens, spec)
        ece = expected_calibration_error(y_ext[:, [c]], p_ext[:, [c]], axis=0)[0]
        assert row["ece_external"] == pytest.approx(ece, abs=1e-12)
    macro = np.mean([auc_ext[LABELS.index(label)] for label in both])
    assert table.loc["Macro", "auc_external"] == pytest.approx(macro, abs=1e-12)
    html = (out / "external.html").read_text()
    assert "data:image/png;base64," in html and "Not independent" not in html
    assert (out / "forest.png").read_bytes().startswith(b"\x89PNG")
    valid = table["resamples_valid"]  # of the 50 resamples of FAST
    assert ((valid >= 1) & (valid <= 50)).all()
    assert valid["Macro"] <= valid.drop(index="Macro").min()


def test_a_second_comparison_reuses_the_evaluations_and_refuses_mismatched_ones(
    run_and_external, capsys
):
    run, external = run_and_external
    argv = ["external", "--run", str(run), "--prepared", str(external), "--split", "all", *FAST]
    main(argv)
    predictions = run / "eval_test" / "predictions.csv"
    written = predictions.stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 0
    assert predictions.stat().st_mtime_ns == written
    assert main([*argv, "--mc-samples", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "mc_samples" in err and "--reevaluate" in err and len(err.splitlines()) == 1
    checkpoint = run / "best.ckpt"  # written again after the evaluations, as by a resume
    later = (run / "eval_test" / "metrics.json").stat().st_mtime + 60
    os.utime(checkpoint, (later, later))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "evaluated before" in err and "--reevaluate" in err and len(err.splitlines()) == 1


def test_the_runs_own_data_as_external_is_called_not_independent(
    mc_dropout_run, prepared, tmp_path, capsys
):
    run = shutil.copytree(mc_dropout_run, tmp_path / "run", ignore=shutil.ignore_patterns("eval_*"))
    out = tmp_path / "comparison"
    argv = ["external", "--run", str(run), "--prepared", str(prepared), *FAST, "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    for report in ("external.html", "external.md"):
        assert "Not independent" in (out / report).read_text()
