"""Expert labels and localisation on real NIH images, checked against pandas on the CSVs directly."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from test_report import CHROMIUM, _console_lines, _screenshot

from cxrfusion.cli import main
from cxrfusion.data.options import PrepareOptions
from cxrfusion.data.prepare import find_beside_table, prepare
from cxrfusion.data.split import read_split, write_split
from cxrfusion.errors import CxrError
from cxrfusion.evaluation.expert_labels import (
    MAPPING,
    expert_comparison,
    expert_label_metrics,
    grouped,
    read_expert_labels,
)
from cxrfusion.labels import LABEL_INDEX, NUM_LABELS
from cxrfusion.training.config import TrainConfig
from cxrfusion.training.fit import train

META = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih14-meta"
EXPERT = META / "google2019_nih-chest-xray-labels.csv.gz"
BOXES = META / "BBox_List_2017.csv.gz"
OTHERS = 160  # training and validation images besides the test patients


def test_grouped_scores_take_the_highest_counterpart() -> None:
    p = np.zeros((1, NUM_LABELS))
    p[0, LABEL_INDEX["Mass"]] = 0.7
    p[0, LABEL_INDEX["Nodule"]] = 0.2
    p[0, LABEL_INDEX["Pneumonia"]] = 0.4
    p[0, LABEL_INDEX["Pneumothorax"]] = 0.1
    assert list(MAPPING) == ["Pneumothorax", "Nodule or mass", "Airspace opacity"]
    assert grouped(p).tolist() == [[0.1, 0.7, 0.4]]


def test_bad_expert_value_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "google.csv"
    path.write_text(
        "Image Index,Fracture,Pneumothorax,Airspace opacity,Nodule or mass\n"
        "a.png,NO,YES,NO,NO\nb.png,NO,maybe,NO,NO\n"
    )
    with pytest.raises(CxrError, match="line 3: Pneumothorax is 'maybe'"):
        read_expert_labels(path)


def test_no_evaluated_image_with_expert_labels_is_a_user_error() -> None:
    rows = pd.DataFrame({"Image Index": ["x.png"], "Patient ID": [1]})
    expert = pd.DataFrame({"Image Index": ["a.png"], **{f: [0] for f in MAPPING}, "Fracture": [0]})
    with pytest.raises(CxrError, match="none of the 1 evaluated images has an expert label"):
        expert_label_metrics(rows, np.zeros((1, NUM_LABELS)), expert, Path("g.csv"))


def _subset(sample: Path, out: Path) -> tuple[Path, set[str]]:
    """A data folder of the sample's images: every image of a patient with an expert label or a
    box (the test patients), plus OTHERS images of other patients; returns it and the test set."""
    table = pd.read_csv(sample / "Data_Entry_2017.csv")
    marked = set(pd.read_csv(EXPERT)["Image Index"]) | set(pd.read_csv(BOXES)["Image Index"])
    test_patients = set(table.loc[table["Image Index"].isin(marked), "Patient ID"])
    is_test = table["Patient ID"].isin(test_patients)
    kept = pd.concat([table[is_test], table[~is_test].head(OTHERS)])
    (out / "images").mkdir(parents=True)
    for name in kept["Image Index"]:
        (out / "images" / name).symlink_to(sample / "images" / name)
    kept.to_csv(out / "Data_Entry_2017.csv", index=False)
    return out, set(kept.loc[kept["Patient ID"].isin(test_patients), "Image Index"])


@pytest.fixture(scope="module")
def sample_eval(nih_sample: Path, tmp_path_factory) -> dict:
    """A 1-epoch tiny network at 64 px whose test split holds every expert-labelled or boxed image
    of the sample, evaluated with --labels google2019 and --boxes."""
    if not META.exists():
        pytest.skip(f"NIH metadata not found at {META}")
    work = tmp_path_factory.mktemp("nih_trust")
    data, test_images = _subset(nih_sample, work / "data")
    prepared = work / "prepared"
    prepare(data, prepared, PrepareOptions(patient_fraction=1.0, size=64, workers=2))
    split = read_split(prepared / "split.csv")
    others = split.loc[~split["Image Index"].isin(test_images), "Patient ID"].unique()
    val_patients = set(others[: len(others) // 4])
    split["split"] = np.where(
        split["Image Index"].isin(test_images),
        "test",
        np.where(split["Patient ID"].isin(val_patients), "val", "train"),
    )
    write_split(split, prepared)
    run = work / "run"
    config = TrainConfig(
        prepared=str(prepared),
        out=str(run),
        model="test_efficientnet",  # timm's tiny net under the MC-dropout head
        epochs=1,
        phase1_epochs=0,
        cache_size=64,
        input_size=64,
        weights="none",
        workers=0,
        batch_size=32,
    )
    train(config)
    out = work / "eval"
    argv = ["evaluate", "--run", str(run), "--out", str(out), "--mc-samples", "2"]
    argv += ["--bootstrap", "50", "--examples", "1", "--labels", "google2019"]
    assert main([*argv, "--labels-file", str(EXPERT), "--boxes", str(BOXES)]) == 0
    return {
        "run": run,
        "out": out,
        "metrics": json.loads((out / "metrics.json").read_text()),
        "predictions": pd.read_csv(out / "predictions.csv"),
        "table": pd.read_csv(nih_sample / "Data_Entry_2017.csv"),
    }


def test_expert_counts_and_aucs_match_an_independent_computation(sample_eval: dict) -> None:
    metrics, predictions = sample_eval["metrics"]["expert_labels"], sample_eval["predictions"]
    expert = pd.read_csv(EXPERT)
    expert = expert[expert["Image Index"].isin(predictions["Image Index"])]
    assert metrics["n_images"] == len(expert) == 53
    assert metrics["mapping"] == {
        "Pneumothorax": "Pneumothorax",
        "Nodule or mass": "max(Nodule, Mass)",
        "Airspace opacity": "max(Consolidation, Pneumonia, Infiltration)",
    }
    assert "Fracture" in metrics["skipped"] and "Fracture" not in metrics["expert"]["classes"]
    expert = expert.rename(columns={finding: f"expert {finding}" for finding in MAPPING})
    joined = expert.merge(predictions, on="Image Index")
    nih = sample_eval["table"].set_index("Image Index").loc[joined["Image Index"], "Finding Labels"]
    for finding, labels in MAPPING.items():
        score = joined[list(labels)].max(axis=1)
        truth = (joined[f"expert {finding}"] == "YES").to_numpy()
        entry = metrics["expert"]["classes"][finding]
        assert entry["positives"] == truth.sum()
        if 0 < truth.sum() < len(truth):
            assert entry["auc"] == pytest.approx(roc_auc_score(truth, score), abs=1e-12)
        nih_truth = nih.str.contains("|".join(labels)).to_numpy()
        assert metrics["nih"]["classes"][finding]["positives"] == nih_truth.sum()
        if 0 < nih_truth.sum() < len(nih_truth):
            assert metrics["nih"]["classes"][finding]["auc"] == pytest.approx(
                roc_auc_score(nih_truth, score), abs=1e-12
            )


def test_box_counts_and_chance_baselines_match_an_independent_computation(
    sample_eval: dict,
) -> None:
    found = sample_eval["metrics"]["localisation"]
    boxes = pd.read_csv(BOXES)
    boxes = boxes[boxes["Image Index"].isin(sample_eval["predictions"]["Image Index"])]
    assert found["n_images"] == boxes["Image Index"].nunique() == 56
    assert found["n_boxes"] == len(boxes)
    boxes = boxes.assign(
        finding=boxes["Finding Label"].replace({"Infiltrate": "Infiltration"}),
        chance=boxes["w"] * boxes["h]"] / 1024**2,
    )
    for finding, part in boxes.groupby("finding"):
        entry = found["findings"][finding]
        assert (entry["boxes"], entry["images"]) == (len(part), part["Image Index"].nunique())
        assert entry["chance"] == pytest.approx(part["chance"].mean())
        assert 0 <= entry["hits"] <= entry["boxes"] and 0 <= entry["mass_inside"] <= 1
        assert 0 <= entry["no_support"] <= entry["boxes"]
    assert (sample_eval["out"] / "localisation.png").is_file()


def test_report_and_compare_show_expert_aucs_and_localisation(
    sample_eval: dict, tmp_path: Path
) -> None:
    report = (sample_eval["out"] / "report.md").read_text()
    assert "## Expert labels (Google 2019)" in report
    assert "max(Consolidation, Pneumonia, Infiltration)" in report
    assert "## Localisation (NIH boxes)" in report
    table = expert_comparison([sample_eval["out"]], ["cnn"])
    expected = sample_eval["metrics"]["expert_labels"]["expert"]["classes"]["Pneumothorax"]["auc"]
    assert table.loc["Pneumothorax", "cnn"] == pytest.approx(expected)
    compared, twin = tmp_path / "compare", tmp_path / "twin"
    shutil.copytree(sample_eval["out"], twin)  # compare needs two runs: the same one twice
    assert main(["compare", str(sample_eval["out"]), str(twin), "--out", str(compared)]) == 0
    assert "## Expert-label ROC-AUC (Google 2019)" in (compared / "comparison.md").read_text()
    if CHROMIUM.exists():
        shot, stderr = _screenshot(sample_eval["out"] / "report.html", tmp_path)
        assert shot.is_file(), stderr[-2000:]
        assert _console_lines(stderr) == []


def test_default_expert_file_is_looked_up_beside_the_nih_table(sample_eval: dict, capsys) -> None:
    argv = ["evaluate", "--run", str(sample_eval["run"]), "--labels", "google2019"]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert "google2019_nih-chest-xray-labels.csv" in error and "--labels-file" in error
    assert len(error.splitlines()) == 1


def test_files_beside_the_nih_table_are_found_from_the_prepared_folder(tmp_path: Path) -> None:
    data, prepared = tmp_path / "nih", tmp_path / "prepared"
    data.mkdir()
    prepared.mkdir()
    (data / "google2019_nih-chest-xray-labels.csv.gz").write_bytes(b"")
    (prepared / "split_summary.json").write_text(
        json.dumps({"source": {"table": str(data / "Data_Entry_2017.csv")}})
    )
    names = ("google2019_nih-chest-xray-labels.csv",)
    assert find_beside_table(prepared, names, "--labels-file") == (
        data / "google2019_nih-chest-xray-labels.csv.gz"
    )
    with pytest.raises(CxrError, match="no BBox_List_2017.csv .* pass --boxes PATH"):
        find_beside_table(prepared, ("BBox_List_2017.csv",), "--boxes PATH")
    (prepared / "split_summary.json").write_text("{}")
    with pytest.raises(CxrError, match="does not record the NIH table .* pass --labels-file"):
        find_beside_table(prepared, names, "--labels-file")
