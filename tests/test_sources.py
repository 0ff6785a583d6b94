"""Every dataset reader on a tiny copy in its published layout, and at full scale where the real
label tables ship with TorchXRayVision: golden labels with their NaNs, views, patients, splits."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from source_layouts import pixels, write_chexpert, write_mimic, write_padchest, write_vindr

from cxrfusion.cli import main
from cxrfusion.data.cache import open_cache
from cxrfusion.data.options import PrepareOptions
from cxrfusion.data.prepare import prepare
from cxrfusion.data.sources import parse_spec, read_source
from cxrfusion.data.sources.labelmap import covered, load_map
from cxrfusion.data.sources.padchest import parse_terms
from cxrfusion.data.split import read_split
from cxrfusion.errors import CxrError
from cxrfusion.labels import LABELS

N = np.nan
TXRV = (
    Path(__file__).resolve().parents[1] / ".venv/lib/python3.11/site-packages/torchxrayvision/data"
)
ALL = PrepareOptions(patient_fraction=1.0, size=32, labels_only=True)


def labels_of(table: pd.DataFrame, image: str) -> np.ndarray:
    return table.set_index("Image Index").loc[image, list(LABELS)].to_numpy(float)


def assert_labels(table: pd.DataFrame, image: str, expected: list[float]) -> None:
    """The image's labels equal the golden row, NaN where NaN."""
    np.testing.assert_array_equal(labels_of(table, image), expected)


def row(**values: float) -> list[float]:
    """A golden label row: the named labels, NaN for the rest."""
    return [values.get(label, N) for label in LABELS]


def assert_no_patient_in_two_splits(split: pd.DataFrame) -> None:
    assert split.groupby("Patient ID")["split"].nunique().max() == 1


def test_chexpert_labels_follow_the_labeler_with_uncertain_masked(tmp_path):
    folder = write_chexpert(tmp_path)
    table = read_source("chexpert", folder, PrepareOptions(views="all"))
    chexpert = dict.fromkeys(
        ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Pneumonia"), 0.0
    ) | {"Pneumothorax": 0.0}
    name = "CheXpert-v1.0-small/train/patient{:05d}/study1/view1_frontal.jpg"
    # patient 4: No Finding; 1: Cardiomegaly, Edema uncertain (NaN), blanks negative;
    # 2: Consolidation, Effusion, Atelectasis uncertain; 3: Edema and Pneumonia.
    assert_labels(table, name.format(4), row(**chexpert))
    assert_labels(table, name.format(1), row(**chexpert | {"Cardiomegaly": 1, "Edema": N}))
    assert_labels(
        table,
        name.format(2),
        row(**chexpert | {"Consolidation": 1, "Effusion": 1, "Atelectasis": N}),
    )
    assert_labels(table, name.format(3), row(**chexpert | {"Edema": 1, "Pneumonia": 1}))
    first = table.set_index("Image Index").loc[name.format(1)]
    assert (first["Patient ID"], first["View Position"], first["Patient Gender"]) == (
        "patient00001",
        "PA",
        "F",
    )
    assert Path(first["Path"]).is_file()
    lateral = table.set_index("Image Index").loc[
        name.format(1).replace("view1_frontal", "view2_lateral")
    ]
    assert lateral["View Position"] == "LATERAL"
    assert set(table["official"]) == {"train", "test"}
    ones = read_source("chexpert", folder, PrepareOptions(uncertain="ones"))
    assert labels_of(ones, name.format(1))[LABELS.index("Edema")] == 1.0


def test_chexpert_no_finding_with_a_finding_is_refused(tmp_path):
    folder = write_chexpert(tmp_path)
    text = (
        (folder / "train.csv")
        .read_text()
        .replace(",1.0,,,,,,,,,,,,,1.0", ",1.0,,1.0,,,,,,,,,,,1.0", 1)
    )
    (folder / "train.csv").write_text(text)
    with pytest.raises(CxrError, match=r"train.csv: line \d+: No Finding with one of our findings"):
        read_source("chexpert", folder, PrepareOptions())


def test_chexpert_prepares_frontal_images_split_by_patient_with_valid_as_official_test(tmp_path):
    folder = write_chexpert(tmp_path)
    out = tmp_path / "out"
    result = prepare(
        f"chexpert:{folder}", out, PrepareOptions(patient_fraction=1.0, size=32, split="official")
    )
    split = read_split(out / "split.csv")
    assert len(split) == 15  # frontal only: 12 train + 3 valid patients
    assert split["Patient ID"].str.startswith("chexpert:patient").all()
    assert set(split.loc[split["split"] == "test", "Patient ID"]) == {
        f"chexpert:patient{p}" for p in (64541, 64542, 64543)
    }
    assert_no_patient_in_two_splits(split)
    assert (
        split[
            [
                "Infiltration",
                "Mass",
                "Nodule",
                "Fibrosis",
                "Emphysema",
                "Hernia",
                "Pleural_Thickening",
            ]
        ]
        .isna()
        .all()
        .all()
    )
    assert (split["source"] == "chexpert").all()
    cache = open_cache(out, 32)
    assert cache.images.shape == (15, 32, 32)
    assert len(result.excluded) == 0


def test_mimic_takes_study_labels_views_and_the_official_split(tmp_path):
    root = write_mimic(tmp_path / "mimic")
    table = read_source("mimic", root, PrepareOptions(views="all"))
    assert len(table) == 24
    name = "files/p10/p10000001/s50000001/d010.jpg"  # subject 1: pattern 1, PA
    np.testing.assert_array_equal(
        labels_of(table, name), labels_of(table, name.replace("d010", "d011"))
    )
    views = table.set_index("Image Index")["View Position"]
    assert views[name] == "PA"
    assert views["files/p10/p10000000/s50000000/d000.jpg"] == "AP_SUPINE"  # AP, recumbent
    assert views["files/p10/p10000002/s50000002/d020.jpg"] == "AP"
    assert views[name.replace("d010", "d011")] == "LATERAL"
    out = tmp_path / "out"
    prepare(f"mimic:{root}", out, ALL)
    split = read_split(out / "split.csv")
    assert len(split) == 12  # frontal only
    assert_no_patient_in_two_splits(split)
    expected = {"train": 8, "val": 2, "test": 2}  # MIMIC's own split by subject, kept as is
    assert split["split"].value_counts().to_dict() == expected


def test_padchest_terms_are_parsed_exactly_and_broken_images_found_by_the_header_check(tmp_path):
    root = write_padchest(tmp_path / "padchest")
    table = read_source("padchest", root, PrepareOptions(views="all"))
    assert len(table) == 24  # the unlabelled row is left out
    zero = dict.fromkeys(LABELS, 0.0)
    by_index = table.set_index("Image Index")
    name = "{}/{:040d}_{:02d}.png"
    assert_labels(table, name.format(0, 0, 0), row(**zero))
    assert_labels(table, name.format(1, 0, 1), row(**zero | {"Effusion": 1, "Cardiomegaly": 1}))
    assert_labels(table, name.format(0, 1, 2), row(**zero | {"Nodule": 1}))  # " nodule "
    assert_labels(table, name.format(1, 1, 3), row(**zero))  # pseudonodule is not a nodule
    assert_labels(table, name.format(0, 2, 4), row(**zero | {"Effusion": 1, "Pneumothorax": 1}))
    assert by_index.loc[name.format(0, 1, 2), "View Position"] == "AP_SUPINE"
    assert by_index.loc[name.format(1, 0, 1), "View Position"] == "LATERAL"
    assert by_index.loc[name.format(0, 0, 0), "Patient Age"] == "85"  # 2015 - 1930
    with pytest.raises(CxrError, match="missing or unreadable image"):
        prepare(
            f"padchest:{root}", tmp_path / "refused", PrepareOptions(patient_fraction=1.0, size=32)
        )
    out = tmp_path / "out"
    result = prepare(
        f"padchest:{root}", out, PrepareOptions(patient_fraction=1.0, size=32, skip_missing=True)
    )
    assert result.excluded["Image Index"].tolist() == [name.format(1, 11, 23)]
    split = read_split(out / "split.csv")
    assert set(split["View Position"]) <= {"PA", "AP", "AP_SUPINE"}
    assert_no_patient_in_two_splits(split)
    # 12-bit values in 16-bit PNGs are stretched like any 16-bit image: the full 8-bit range.
    cache = open_cache(out, 32)
    assert cache.images[0].max() > 200


def test_padchest_labels_must_be_a_list_of_known_terms(tmp_path):
    with pytest.raises(CxrError, match="not a list of terms"):
        parse_terms("pleural effusion", "x.csv: line 2")
    root = write_padchest(tmp_path / "padchest", broken=False)
    table = root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"
    frame = pd.read_csv(table, keep_default_na=False)
    frame.loc[3, "Labels"] = "['nodulee']"
    frame.to_csv(table, index=False)
    with pytest.raises(CxrError, match=r"line 5: term 'nodulee' is not in label_maps/padchest.csv"):
        read_source("padchest", root, PrepareOptions())


@pytest.mark.parametrize(
    ("readers", "image", "expected"),
    [
        ("majority", "a", {"Cardiomegaly": 1}),  # 2 of 3
        ("majority", "b", {}),  # 1 of 3
        ("majority", "c", {"Pneumothorax": 1}),  # 3 of 3; Nodule/Mass is none of ours
        ("majority", "e", {}),  # R1's two boxes count once
        ("union", "b", {"Effusion": 1}),
        ("union", "e", {"Infiltration": 1, "Atelectasis": 1}),
        ("any:2", "f", {"Fibrosis": 1}),
        ("any:3", "a", {}),
    ],
)
def test_vindr_readers_combine_as_asked(tmp_path, readers, image, expected):
    root = write_vindr(tmp_path / "vindr")
    table = read_source("vindr", root, PrepareOptions(readers=readers))
    reported = ("Atelectasis", "Cardiomegaly", "Consolidation", "Effusion", "Fibrosis")
    reported += ("Infiltration", "Pleural_Thickening", "Pneumothorax")
    golden = row(**dict.fromkeys(reported, 0.0) | expected)
    assert_labels(table, f"train/{image}.dicom", golden)


def test_vindr_test_consensus_is_the_official_test_split_and_monochrome1_is_inverted(tmp_path):
    root = write_vindr(tmp_path / "vindr")
    out = tmp_path / "out"
    prepare(f"vindr:{root}", out, PrepareOptions(size=32, patient_fraction=1.0, val=0.3))
    split = read_split(out / "split.csv")
    test = split[split["split"] == "test"].set_index("Image Index")
    assert test.index.tolist() == ["test/t1.dicom", "test/t2.dicom"]
    assert test.loc["test/t1.dicom", ["Cardiomegaly", "Effusion"]].tolist() == [1.0, 1.0]
    assert split["Patient ID"].tolist() == ["vindr:" + Path(n).stem for n in split["Image Index"]]
    cache = open_cache(out, 32)
    # MONOCHROME1 stores 4095 - v: decoded, the body is bright again, as in the source pixels.
    decoded = cache.images[cache.rows["test/t1.dicom"]].astype(float).ravel()
    source = np.asarray(Image.fromarray(pixels(0)).resize((32, 32))).astype(float).ravel()
    assert np.corrcoef(decoded, source)[0, 1] > 0.9


def test_merged_sources_namespace_patients_and_split_each_source_by_patient(tmp_path, phantoms):
    specs = [
        f"nih:{phantoms}",
        f"chexpert:{write_chexpert(tmp_path)}",
        f"mimic:{write_mimic(tmp_path / 'mimic')}",
        f"padchest:{write_padchest(tmp_path / 'padchest', broken=False)}",
        f"vindr:{write_vindr(tmp_path / 'vindr')}",
    ]
    out = tmp_path / "merged"
    prepare(specs, out, PrepareOptions(patient_fraction=1.0, labels_only=True))
    split = read_split(out / "split.csv")
    assert_no_patient_in_two_splits(split)
    assert set(split["source"]) == {"nih", "chexpert", "mimic", "padchest", "vindr"}
    prefixes = split["Patient ID"].str.split(":").str[0]
    assert (prefixes == split["source"]).all()
    nih = split[split["source"] == "nih"]
    assert not nih[list(LABELS)].isna().any().any()
    assert split.loc[split["source"] == "chexpert", "Hernia"].isna().all()
    assert set(split.groupby("source")["split"].nunique()) == {3}
    summary = json.loads((out / "split_summary.json").read_text())
    assert [d["dataset"] for d in summary["source"]["datasets"]] == [
        "nih",
        "chexpert",
        "mimic",
        "padchest",
        "vindr",
    ]
    assert summary["source"]["uncertain"] == "mask" and summary["source"]["readers"] == "majority"


def test_parse_spec_names_the_dataset_or_takes_a_plain_path_as_nih(tmp_path):
    assert parse_spec(tmp_path) == ("nih", tmp_path)
    assert parse_spec(f"padchest:{tmp_path}") == ("padchest", tmp_path)
    with pytest.raises(CxrError, match="unknown dataset 'chexpret'"):
        parse_spec(f"chexpret:{tmp_path}")
    with pytest.raises(CxrError, match="no such folder"):
        parse_spec(f"vindr:{tmp_path / 'nowhere'}")


def test_label_maps_cover_what_each_dataset_reports():
    assert not covered("chexpert")[
        [LABELS.index(n) for n in ("Infiltration", "Mass", "Nodule", "Hernia")]
    ].any()
    assert covered("padchest").all()
    assert load_map("padchest")["pseudonodule"] == ()
    assert load_map("padchest")["hydropneumothorax"] == ("Effusion", "Pneumothorax")


def test_prepare_cli_merges_repeated_data_and_checks_reader_options(tmp_path, capsys):
    folder = write_chexpert(tmp_path)
    code = main(
        [
            "prepare",
            "--data",
            f"chexpert:{folder}",
            "--out",
            str(tmp_path / "o"),
            "--labels-only",
            "--readers",
            "most",
        ]
    )
    assert code == 2
    assert "readers (--readers) must be majority, union or any:N" in capsys.readouterr().err
    code = main(
        [
            "prepare",
            "--data",
            f"chexpert:{folder}",
            "--out",
            str(tmp_path / "o"),
            "--labels-only",
            "--views",
            "all",
            "--patient-fraction",
            "1",
        ]
    )
    assert code == 0
    assert len(read_split(tmp_path / "o" / "split.csv")) == 30


def _full_scale(tmp_path: Path, source: str, table: str, name: str) -> tuple[pd.DataFrame, float]:
    if not (TXRV / table).is_file():
        pytest.skip(f"TorchXRayVision's {table} not installed")
    (tmp_path / source).mkdir()
    (tmp_path / source / name).symlink_to(TXRV / table)
    started = time.perf_counter()
    prepare(
        f"{source}:{tmp_path / source}",
        tmp_path / "out",
        PrepareOptions(labels_only=True, patient_fraction=1.0),
    )
    seconds = time.perf_counter() - started
    split = read_split(tmp_path / "out" / "split.csv")
    assert_no_patient_in_two_splits(split)
    print(
        f"{source}: {len(split):,} images, {split['Patient ID'].nunique():,} patients in {seconds:.1f} s"
    )
    return split, seconds


def test_chexpert_full_table_at_scale(tmp_path):
    split, _ = _full_scale(tmp_path, "chexpert", "chexpert_train.csv.gz", "train.csv.gz")
    assert len(split) == 191_027 - 17  # frontal AP or PA; 17 frontal LL/RL films are UNKNOWN
    assert split["Mass"].isna().all() and split["Cardiomegaly"].notna().mean() > 0.9


def test_padchest_full_table_at_scale(tmp_path):
    split, _ = _full_scale(
        tmp_path, "padchest", "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz",
        "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz",
    )  # fmt: skip
    assert set(split["View Position"]) == {"PA", "AP", "AP_SUPINE"}
    assert not split[list(LABELS)].isna().any().any()
    assert split["Nodule"].sum() > 2000  # "nodule" and "multiple nodules", never "pseudonodule"


def test_vindr_full_table_at_scale(tmp_path):
    split, _ = _full_scale(tmp_path, "vindr", "vinbigdata-train.csv.gz", "train.csv.gz")
    assert len(split) == 15_000
    assert 0 < split["Cardiomegaly"].mean() < 0.3
