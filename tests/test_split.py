"""Patient-wise splits: no leakage, stratified, reproducible byte for byte."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrfusion.data.nih import DEMOGRAPHIC_COLUMNS, find_table, read_official_lists, read_table
from cxrfusion.data.split import (
    SPLITS,
    make_split,
    read_split,
    summarise,
    write_split,
    write_summary,
)
from cxrfusion.errors import CxrError
from cxrfusion.labels import LABELS

META = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih14-meta"


def tiny_table(patients: int = 200, seed: int = 0) -> pd.DataFrame:
    """`read_table`-shaped frame: 1-6 images per patient, sparse correlated labels."""
    rng = np.random.default_rng(seed)
    per_patient = rng.integers(1, 7, size=patients)
    patient_ids = np.repeat(np.arange(1, patients + 1) * 7, per_patient)
    images = [
        f"{p:08d}_{i:03d}.png"
        for p in np.unique(patient_ids)
        for i in range((patient_ids == p).sum())
    ]
    labels = rng.random((len(patient_ids), len(LABELS))) < np.linspace(0.02, 0.3, len(LABELS))
    table = pd.DataFrame({"Image Index": images, "Patient ID": patient_ids.astype(np.int64)})
    return pd.concat([table, pd.DataFrame(labels.astype(np.uint8), columns=list(LABELS))], axis=1)


def patients_per_split(split: pd.DataFrame) -> dict[str, set[int]]:
    return {name: set(split.loc[split["split"] == name, "Patient ID"]) for name in SPLITS}


def assert_no_patient_in_two_splits(split: pd.DataFrame) -> None:
    groups = patients_per_split(split)
    assert not groups["train"] & groups["val"]
    assert not groups["train"] & groups["test"]
    assert not groups["val"] & groups["test"]


def test_split_has_the_documented_columns_and_keeps_table_order():
    table = tiny_table()
    split = make_split(table, patient_fraction=1.0)
    assert list(split.columns) == ["Image Index", "Patient ID", "split", *LABELS]
    assert split["Image Index"].tolist() == table["Image Index"].tolist()
    assert set(split["split"]) == set(SPLITS)
    pd.testing.assert_frame_equal(split[list(LABELS)], table[list(LABELS)].astype(np.float32))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_never_puts_a_patient_in_two_splits(seed):
    assert_no_patient_in_two_splits(make_split(tiny_table(seed=seed), seed=seed))


def test_patient_fraction_keeps_that_share_of_patients_and_all_their_images():
    table = tiny_table(patients=200)
    split = make_split(table, patient_fraction=0.5)
    kept = set(split["Patient ID"])
    assert len(kept) == 100
    assert len(split) == int(table["Patient ID"].isin(kept).sum())


def test_same_seed_gives_a_byte_identical_split_file(tmp_path):
    table = tiny_table()
    first = write_split(make_split(table, seed=3), tmp_path / "a")
    second = write_split(make_split(table, seed=3), tmp_path / "b")
    other = write_split(make_split(table, seed=4), tmp_path / "c")
    assert first.name == "split.csv"
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes() != other.read_bytes()
    assert b"\r" not in first.read_bytes()


def test_read_split_round_trips_write_split(tmp_path):
    split = make_split(tiny_table())
    pd.testing.assert_frame_equal(read_split(write_split(split, tmp_path)), split)


def test_split_keeps_sex_age_and_view_of_each_image_through_prepare(phantoms, prepared):
    table = read_table(find_table(phantoms)).set_index("Image Index")
    split = read_split(prepared / "split.csv").set_index("Image Index")
    demographics = list(DEMOGRAPHIC_COLUMNS)
    assert list(split.columns[-4:]) == [*demographics, "source"]
    pd.testing.assert_frame_equal(split[demographics], table.loc[split.index, demographics])
    assert set(split["View Position"]) == {"PA", "AP"}


def test_an_older_split_without_demographics_still_reads(tmp_path):
    split = make_split(tiny_table())
    assert read_split(write_split(split, tmp_path)).columns.tolist() == split.columns.tolist()
    assert not set(DEMOGRAPHIC_COLUMNS) & set(split.columns)


def test_read_split_rejects_an_unknown_split_name(tmp_path):
    split = make_split(tiny_table())
    split.loc[0, "split"] = "holdout"
    with pytest.raises(CxrError, match="unknown split 'holdout'"):
        read_split(write_split(split, tmp_path))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"method": "random"}, "split method must be one of iterative, official"),
        ({"patient_fraction": 0.0}, r"patient_fraction must be in \(0, 1\]"),
        ({"patient_fraction": 1.5}, r"patient_fraction must be in \(0, 1\]"),
        ({"val": 1.0}, r"val must be in \(0, 1\)"),
        ({"test": -0.1}, r"test must be in \(0, 1\)"),
        ({"val": 0.5, "test": 0.5}, "val \\+ test must be below 1"),
        ({"method": "official"}, "needs train_val_list.txt and test_list.txt"),
    ],
)
def test_split_rejects_bad_arguments(arguments, message):
    with pytest.raises(CxrError, match=message):
        make_split(tiny_table(), **arguments)


def test_split_needs_at_least_three_patients():
    with pytest.raises(CxrError, match="too few patients"):
        make_split(tiny_table(patients=2), patient_fraction=1.0)


def official_lists_for(table: pd.DataFrame) -> tuple[set[str], set[str]]:
    """The last quarter of patients is the test list, the rest train_val."""
    test_patients = set(np.unique(table["Patient ID"])[-len(np.unique(table["Patient ID"])) // 4 :])
    in_test = table["Patient ID"].isin(test_patients)
    return set(table["Image Index"][~in_test]), set(table["Image Index"][in_test])


def image_of_a_patient_with_several(table: pd.DataFrame, names: set[str]) -> str:
    """An image among `names` whose patient has other images too."""
    several = table["Patient ID"].map(table["Patient ID"].value_counts()) > 1
    return table.loc[several & table["Image Index"].isin(names), "Image Index"].iloc[0]


def test_official_split_uses_the_test_list_exactly_and_carves_val_by_patient():
    table = tiny_table()
    train_val, test = official_lists_for(table)
    split = make_split(
        table, method="official", patient_fraction=0.5, official_lists=(train_val, test)
    )
    assert set(split.loc[split["split"] == "test", "Image Index"]) == test
    assert len(split) == len(table)
    assert_no_patient_in_two_splits(split)
    assert 0.05 < (split["split"] == "val").mean() < 0.15


def test_official_split_leaves_out_images_in_neither_list():
    table = tiny_table()
    train_val, test = official_lists_for(table)
    unlisted = image_of_a_patient_with_several(table, train_val)
    split = make_split(table, method="official", official_lists=(train_val - {unlisted}, test))
    assert unlisted not in set(split["Image Index"])
    assert len(split) == len(table) - 1


def test_official_split_rejects_lists_that_share_a_patient():
    table = tiny_table()
    train_val, test = official_lists_for(table)
    moved = image_of_a_patient_with_several(table, train_val)
    with pytest.raises(CxrError, match="test_list.txt: patient .* also has images in train_val"):
        make_split(table, method="official", official_lists=(train_val - {moved}, test | {moved}))


def test_summary_counts_images_patients_and_positives(tmp_path):
    table = tiny_table()
    split = make_split(table)
    summary = summarise(split)
    assert sum(summary[name]["images"] for name in SPLITS) == summary["overall"]["images"]
    assert sum(summary[name]["patients"] for name in SPLITS) == split["Patient ID"].nunique()
    test = split[split["split"] == "test"]
    assert summary["test"]["labels"]["Hernia"]["positives"] == int(test["Hernia"].sum())
    assert summary["test"]["labels"]["Hernia"]["prevalence"] == round(
        float(test["Hernia"].mean()), 6
    )
    json_path, md_path = write_summary(summary, tmp_path)
    assert json.loads(json_path.read_text()) == summary
    markdown = md_path.read_text()
    assert "| Pneumothorax |" in markdown
    assert f"| images | {summary['train']['images']:,} |" in markdown


# --- the real table: the acceptance figures (one shared default split keeps this fast) ---


@pytest.fixture(scope="module")
def real() -> dict:
    if not META.is_dir():
        pytest.skip(f"real NIH metadata not available at {META}")
    start = time.perf_counter()
    table = read_table(find_table(META))
    split = make_split(table)
    return {"table": table, "split": split, "seconds": time.perf_counter() - start}


def test_real_table_reads_and_splits_within_a_minute(real):
    assert real["seconds"] < 60, f"read + iterative split took {real['seconds']:.1f} s"


def test_real_split_shares_no_patient_and_halves_the_patients(real):
    assert_no_patient_in_two_splits(real["split"])
    assert real["split"]["Patient ID"].nunique() == round(0.5 * 30_805)


def test_real_split_is_byte_identical_across_runs(real, tmp_path):
    again = make_split(real["table"])
    first = write_split(real["split"], tmp_path / "a").read_bytes()
    assert write_split(again, tmp_path / "b").read_bytes() == first


def test_real_split_of_all_patients_meets_shares_and_keeps_prevalence(real):
    summary = summarise(make_split(real["table"], patient_fraction=1.0))
    overall = summary["overall"]["labels"]
    for name, target in zip(SPLITS, (0.7, 0.1, 0.2), strict=True):
        assert abs(summary[name]["image_share"] - target) <= 0.015, name
        for label in LABELS:
            if overall[label]["positives"] >= 100:
                relative = (
                    summary[name]["labels"][label]["prevalence"] / overall[label]["prevalence"]
                )
                assert abs(relative - 1) <= 0.2, (name, label, relative)


def test_real_official_split_tests_exactly_the_test_list(real):
    train_val, test = read_official_lists(META)
    split = make_split(real["table"], method="official", official_lists=(train_val, test))
    assert set(split.loc[split["split"] == "test", "Image Index"]) == test
    assert (split["split"] == "test").sum() == 25_596
    assert_no_patient_in_two_splits(split)
