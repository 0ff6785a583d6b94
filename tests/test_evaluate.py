"""The evaluate pipeline on a trained MC-dropout run: what metrics.json, the report and the run
directory hold, and that an evaluation folder appears complete or not at all."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from cxrfusion.data.nih import DEMOGRAPHIC_COLUMNS
from cxrfusion.errors import CxrError
from cxrfusion.evaluation import evaluate as pipeline
from cxrfusion.evaluation.evaluate import EvaluateOptions, evaluate
from cxrfusion.labels import LABELS
from cxrfusion.stats.temperature import read_temperature, write_temperature

QUICK = dict(bootstrap=100, examples=1, mc_samples=5)


@pytest.fixture(scope="module")
def run(mc_dropout_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the shared trained run: evaluations here write temperature.json into it."""
    copy = tmp_path_factory.mktemp("evaluate") / "mc_dropout"
    return Path(shutil.copytree(mc_dropout_run, copy, ignore=shutil.ignore_patterns("eval_*")))


@pytest.fixture(scope="module")
def scaled(run: Path) -> Path:
    """The test split evaluated with temperature scaling (shared by the tests that read it)."""
    return evaluate(run, options=EvaluateOptions(temperature_scale=True, **QUICK))


@pytest.fixture(scope="module")
def saturated(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test split evaluated with temperatures of 0.05 (logits x 20): probabilities saturate."""
    copy = Path(shutil.copytree(run, tmp_path_factory.mktemp("saturated") / "run"))
    write_temperature(copy, np.full(len(LABELS), 0.05), {"split": "made by the test"})
    return evaluate(copy, options=EvaluateOptions(**QUICK))


def test_predictions_csv_reproduces_every_auc_and_auprc_of_metrics_json(saturated: Path) -> None:
    metrics = json.loads((saturated / "metrics.json").read_text())
    predictions = pd.read_csv(saturated / "predictions.csv", float_precision="round_trip")
    probabilities = predictions[list(LABELS)].to_numpy()
    # Saturated: 6 significant digits would write many of these as 1 or 0 and tie them.
    assert ((probabilities > 1 - 1e-6) | (probabilities < 1e-12)).mean() > 0.1
    for label in LABELS:
        truth, auprc = predictions[f"true_{label}"], metrics["auprc"]["classes"][label]
        assert auprc["prevalence"] == pytest.approx(truth.mean(), abs=1e-12)
        auc = metrics["auc"]["classes"][label]["auc"]
        if 0 < truth.sum() < len(truth):
            assert auc == pytest.approx(roc_auc_score(truth, predictions[label]), abs=1e-12)
            expected = average_precision_score(truth, predictions[label])
            assert auprc["auprc"] == pytest.approx(expected, abs=1e-12)
        else:
            assert auc is None
    assert metrics["auc"]["macro"]["n_valid"] <= metrics["auc"]["n_resamples"] == 100


def test_operating_points_are_chosen_on_validation(scaled: Path) -> None:
    points = json.loads((scaled / "metrics.json").read_text())["operating_points"]
    defined = [e for e in points["classes"].values() if e["youden"]["threshold"] is not None]
    assert len(defined) >= 10
    for entry in defined:
        assert entry["sensitivity_target"]["val_sensitivity"] >= 0.9
        # The 90 % point is the highest threshold reaching it, so never above Youden's when
        # Youden's sensitivity is below 90 %.
        if entry["youden"]["val_sensitivity"] < 0.9:
            assert entry["sensitivity_target"]["threshold"] < entry["youden"]["threshold"]


def test_subgroup_aucs_cover_sex_age_band_and_view(scaled: Path) -> None:
    metrics = json.loads((scaled / "metrics.json").read_text())
    subgroups, images = metrics["subgroups"], metrics["counts"]["images"]
    assert set(subgroups["sex"]) == {"F", "M"} and set(subgroups["view"]) == {"AP", "PA"}
    for kind in ("sex", "view"):
        assert sum(g["images"] for g in subgroups[kind].values()) == images
    assert set(subgroups["age"]) <= {"<40", "40-59", "60-79", "80+"}
    report = (scaled / "report.md").read_text()
    assert "## Subgroups" in report and "| sex F |" in report and "## Operating points" in report


def test_temperatures_are_saved_in_the_run_and_reliability_shows_before_and_after(
    scaled: Path,
) -> None:
    metrics = json.loads((scaled / "metrics.json").read_text())
    saved = read_temperature(scaled.parent)
    np.testing.assert_allclose(saved, [metrics["temperature"][label] for label in LABELS])
    record = json.loads((scaled.parent / "temperature.json").read_text())
    assert record["fitted_on"]["split"] == "val" and record["fitted_on"]["mc_samples"] == 5
    fit = record["fit"]["classes"]
    positives = pd.read_csv(scaled.parent / "split.csv").query("split == 'val'")[list(LABELS)].sum()
    assert {label: fit[label]["positives"] for label in LABELS} == positives.to_dict()
    for label in LABELS:  # a class without its own fit takes the shared value
        assert fit[label]["own_fit"] or fit[label]["temperature"] == record["fit"]["shared"]
    assert set(metrics["calibration_before_temperature"]) == {"ECE", "Brier", "NLL"}
    assert metrics["notes"] == []
    html = (scaled / "report.html").read_text()
    assert "after temperature scaling" in html and "validation positives" in html


def test_evaluating_the_split_temperatures_were_fitted_on_warns_and_replaces_the_old_folder(
    run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "eval_val"
    out.mkdir()
    (out / "metrics.json").write_text("{}")  # an older evaluation: replaced as a whole
    (out / "stale.txt").write_text("from an older evaluation")
    options = EvaluateOptions(split="val", temperature_scale=True, **QUICK)
    with caplog.at_level(logging.WARNING):
        evaluate(run, out, options)
    assert any("fitted on the val split" in r.getMessage() for r in caplog.records)
    notes = json.loads((out / "metrics.json").read_text())["notes"]
    assert any("fitted on the val split" in note for note in notes)
    assert "fitted on the val split" in (out / "report.md").read_text()
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval_val"]


def test_a_failed_evaluation_leaves_no_folder_behind_and_the_old_one_intact(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(pipeline, "evaluation_figures", broken)
    with pytest.raises(RuntimeError, match="drawing failed"):
        evaluate(run, tmp_path / "new", EvaluateOptions(**QUICK))
    assert list(tmp_path.iterdir()) == []
    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.json").write_text("{}")
    with pytest.raises(RuntimeError, match="drawing failed"):
        evaluate(run, old, EvaluateOptions(**QUICK))
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
    assert (old / "metrics.json").read_text() == "{}"


def test_a_split_without_demographic_columns_skips_subgroups_with_a_note(
    run: Path, tmp_path: Path
) -> None:
    older = Path(shutil.copytree(run, tmp_path / "older_run"))
    split = pd.read_csv(older / "split.csv")
    split.drop(columns=list(DEMOGRAPHIC_COLUMNS)).to_csv(older / "split.csv", index=False)
    out = evaluate(older, tmp_path / "eval", EvaluateOptions(split="val", **QUICK))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["subgroups"] == {} and "subgroups skipped" in metrics["subgroups_note"]
    assert "subgroups skipped" in (out / "report.md").read_text()


def test_out_never_replaces_the_run_or_a_folder_that_is_not_an_evaluation(
    run: Path, tmp_path: Path
) -> None:
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(CxrError, match="replace the run itself"):
        evaluate(run, out=run)
    with pytest.raises(CxrError, match="replace the run itself"):
        evaluate(run, out=run.parent)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("keep me")
    with pytest.raises(CxrError, match="not an evaluation"):
        evaluate(run, out=notes)
    assert sorted(p.name for p in run.iterdir()) == before
    assert (notes / "mine.txt").read_text() == "keep me"


def test_a_saved_temperature_is_applied_by_a_later_evaluation_without_scaling(
    run: Path, scaled: Path, tmp_path: Path
) -> None:
    out = evaluate(run, out=tmp_path / "again", options=EvaluateOptions(**QUICK))
    metrics = json.loads((out / "metrics.json").read_text())
    saved = read_temperature(run)
    assert np.allclose([metrics["temperature"][label] for label in LABELS], saved)
    assert any("temperature.json" in note for note in metrics["notes"])
    first = pd.read_csv(scaled / "predictions.csv")
    again = pd.read_csv(out / "predictions.csv")
    assert np.allclose(first[list(LABELS)], again[list(LABELS)], atol=1e-6)
