"""Specifications of the run comparison (the report's Table 2: per-class AUC and DeLong tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrfusion.errors import CxrError
from cxrfusion.evaluation.compare import compare_runs, p_column, write_comparison
from cxrfusion.labels import LABELS, NUM_LABELS
from cxrfusion.stats.delong import clustered_delong_test, delong_test, holm
from cxrfusion.stats.metrics import macro_auc, per_class_auc

N_IMAGES = 600


def _truth(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y = (rng.random((N_IMAGES, NUM_LABELS)) < 0.25).astype(np.uint8)
    y[:, LABELS.index("Hernia")] = 0
    return y


def _write_predictions(eval_dir: Path, y: np.ndarray, prob: np.ndarray, order: np.ndarray) -> Path:
    """A predictions.csv as `cxrfusion evaluate` writes it, rows in the given image order."""
    frame = pd.DataFrame({"Image Index": [f"{i:08d}_000.png" for i in range(len(y))]})
    frame["Patient ID"] = np.arange(len(y)) // 2
    for c, label in enumerate(LABELS):
        frame[label] = prob[:, c]
        frame[f"{label}_std"] = 0.01
    frame["uncertainty"] = 0.01
    frame["flag"] = 0
    for c, label in enumerate(LABELS):
        frame[f"true_{label}"] = y[:, c]
    eval_dir.mkdir(parents=True)
    frame.iloc[order].to_csv(eval_dir / "predictions.csv", index=False)
    return eval_dir


@pytest.fixture
def runs(tmp_path: Path) -> dict:
    """Two runs on the same images: a good model and a noisy one, saved in different row orders."""
    y = _truth()
    rng = np.random.default_rng(1)
    good = 1 / (1 + np.exp(-(3.0 * y - 1.5 + rng.normal(0, 1.0, y.shape))))
    noisy = 1 / (1 + np.exp(-(0.8 * y - 0.4 + rng.normal(0, 1.0, y.shape))))
    good_dir = _write_predictions(tmp_path / "good" / "eval_test", y, good, np.arange(N_IMAGES))
    shuffled = rng.permutation(N_IMAGES)
    noisy_dir = _write_predictions(tmp_path / "noisy" / "eval_test", y, noisy, shuffled)
    return {"y": y, "good": good, "noisy": noisy, "dirs": [noisy_dir, good_dir]}


def test_table_holds_per_class_auc_of_each_model_on_aligned_images(runs: dict) -> None:
    result = compare_runs(runs["dirs"])
    assert result.names == ["noisy", "good"]
    assert list(result.table.index) == [*LABELS, "Macro"]
    for name in ("good", "noisy"):
        expected = per_class_auc(runs["y"], runs[name])
        np.testing.assert_allclose(result.table[name].iloc[:-1], expected, rtol=0, atol=1e-12)
        assert result.table.loc["Macro", name] == pytest.approx(macro_auc(expected))
    assert np.isnan(result.table.loc["Hernia", "good"])
    assert result.table["positives"].iloc[:-1].tolist() == runs["y"].sum(axis=0).tolist()
    assert result.n_images == N_IMAGES


def test_reference_defaults_to_the_first_run_never_the_best_on_the_test_set(runs: dict) -> None:
    result = compare_runs(runs["dirs"])
    assert result.table.loc["Macro", "good"] > result.table.loc["Macro", "noisy"]
    assert result.reference == "noisy"
    assert p_column("good", "noisy") in result.table.columns
    assert p_column("noisy", "noisy") not in result.table.columns


def test_reference_can_be_given_as_a_run_folder(runs: dict) -> None:
    good_run = runs["dirs"][1].parent
    assert compare_runs(runs["dirs"], reference=good_run).reference == "good"
    assert compare_runs(runs["dirs"], reference=runs["dirs"][1]).reference == "good"


def test_good_model_differs_significantly_on_most_classes(runs: dict) -> None:
    p = compare_runs(runs["dirs"], reference="good").table[p_column("noisy", "good")]
    tested = p.drop(["Hernia", "Macro"])
    assert (tested < 0.01).sum() >= 11
    assert np.isnan(p["Hernia"]) and np.isnan(p["Macro"])


def test_p_values_are_holm_corrected_patient_clustered_delong_p_values(runs: dict) -> None:
    y, patients = runs["y"], np.arange(N_IMAGES) // 2
    raw = [
        clustered_delong_test(y[:, c], runs["noisy"][:, c], runs["good"][:, c], patients)["p_value"]
        for c in range(14)
    ]
    plain = [delong_test(y[:, c], runs["noisy"][:, c], runs["good"][:, c])[2] for c in range(14)]
    assert not np.allclose(raw, plain, rtol=0.01, atol=0, equal_nan=True), "patients ignored"
    result = compare_runs(runs["dirs"], names=["B", "A"], reference="A")
    p = result.table[p_column("B", "A")].iloc[:-1].to_numpy()
    np.testing.assert_allclose(p, holm(np.array(raw)), rtol=1e-12, equal_nan=True)
    assert np.nanmax(p - np.array(raw)) > 0, "Holm must raise at least one p-value"


def test_a_model_against_itself_is_not_significant(runs: dict, tmp_path: Path) -> None:
    copy = _write_predictions(tmp_path / "copy", runs["y"], runs["good"], np.arange(N_IMAGES))
    result = compare_runs([runs["dirs"][1], copy], names=["good", "copy"], reference="good")
    assert np.nanmin(result.table[p_column("copy", "good")]) == 1.0


def test_different_image_sets_are_a_user_error_naming_the_folder(
    runs: dict, tmp_path: Path
) -> None:
    y, prob = runs["y"][:-1], runs["good"][:-1]
    short = _write_predictions(tmp_path / "short" / "eval_test", y, prob, np.arange(len(y)))
    with pytest.raises(CxrError, match=r"short/eval_test/predictions\.csv: its 599 images differ"):
        compare_runs([runs["dirs"][1], short])


def test_different_true_labels_are_a_user_error(runs: dict, tmp_path: Path) -> None:
    y = runs["y"].copy()
    y[0, 0] = 1 - y[0, 0]
    other = _write_predictions(tmp_path / "other", y, runs["good"], np.arange(N_IMAGES))
    with pytest.raises(CxrError, match="patients or true labels differ"):
        compare_runs([runs["dirs"][1], other])


def test_missing_predictions_are_a_user_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(CxrError, match=r"empty_run/predictions\.csv: missing"):
        compare_runs([tmp_path / "empty_run"])


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text.replace("Patient ID,", "Patient,", 1),
        lambda text: text.replace("\n00000000_000.png,0,0.", "\n00000000_000.png,0,x", 1),
        lambda text: "\n".join(text.splitlines()[:-5]),
        lambda text: text.replace(",", ";"),
        lambda text: "",
    ],
    ids=["missing column", "non-numeric value", "truncated", "wrong delimiter", "empty"],
)
def test_a_corrupt_predictions_file_is_a_one_line_user_error_naming_it(
    runs: dict, damage, tmp_path: Path
) -> None:
    path = runs["dirs"][0] / "predictions.csv"
    path.write_text(damage(path.read_text()))
    with pytest.raises(CxrError, match=r"noisy/eval_test/predictions\.csv") as error:
        compare_runs(runs["dirs"])
    assert "\n" not in str(error.value)


def test_an_unknown_reference_is_a_user_error(runs: dict) -> None:
    with pytest.raises(CxrError, match="--reference best: neither a model name"):
        compare_runs(runs["dirs"], reference="best")


def test_duplicate_names_are_a_user_error(runs: dict) -> None:
    with pytest.raises(CxrError, match="unique"):
        compare_runs(runs["dirs"], names=["a", "a"])


def test_write_comparison_writes_csv_markdown_and_html(runs: dict, tmp_path: Path) -> None:
    result = compare_runs(runs["dirs"], reference="good")
    md, csv, html = write_comparison(result, tmp_path / "out")
    assert [md.name, csv.name, html.name] == ["comparison.md", "comparison.csv", "comparison.html"]
    table = pd.read_csv(csv, index_col="label")
    pd.testing.assert_frame_equal(table, result.table, check_dtype=False, check_exact=False)
    text = md.read_text(encoding="utf-8")
    assert "| label | positives | noisy | good | p (noisy vs good) |" in text
    good = result.table.loc["Effusion", "good"]
    assert f"| Effusion | {result.table.loc['Effusion', 'positives']} |" in text
    assert f"| {good:.3f} | < 0.001 |" in text
    assert "| Hernia | 0 |  |  |  |" in text
    page = html.read_text(encoding="utf-8")
    assert "<th>p (noisy vs good)</th>" in page and "&lt; 0.001" in page
