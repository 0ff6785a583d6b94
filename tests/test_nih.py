"""Reading the NIH label table, locating images and the official lists."""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import numpy as np
import pytest

from cxrfusion.data.nih import (
    DEMOGRAPHIC_COLUMNS,
    find_images,
    find_table,
    read_official_lists,
    read_table,
)
from cxrfusion.errors import CxrError
from cxrfusion.labels import LABELS

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
V2020_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
ROWS = [
    ("00000001_000.png", "Cardiomegaly", 1),
    ("00000001_001.png", "Cardiomegaly|Emphysema", 1),
    ("00000002_000.png", "No Finding", 2),
    ("00000003_000.png", "Hernia|Pneumothorax|Atelectasis", 3),
]


def write_table(
    path: Path, rows: list[tuple[str, str, object]], form: str = "v2020", header: str = V2020_HEADER
) -> Path:
    """An NIH table as published: 'v2020' (11 fields) or '2017' (trailing empty column)."""
    trailing = "," if form == "2017" else ""
    lines = [header + trailing]
    lines += [f"{i},{f},0,{p},57,M,PA,2682,2749,0.143,0.143{trailing}" for i, f, p in rows]
    text = "\n".join(lines) + "\n"
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def label_row(table, image: str) -> dict[str, int]:
    row = table.set_index("Image Index").loc[image]
    return {label: int(row[label]) for label in LABELS if row[label]}


@pytest.mark.parametrize(
    ("form", "name"),
    [("2017", "Data_Entry_2017.csv"), ("v2020", "Data_Entry_2017_v2020.csv.gz")],
)
def test_read_table_accepts_both_published_forms(tmp_path, form, name):
    table = read_table(write_table(tmp_path / name, ROWS, form))
    assert list(table.columns) == ["Image Index", "Patient ID", *LABELS, *DEMOGRAPHIC_COLUMNS]
    assert table["Image Index"].tolist() == [row[0] for row in ROWS]
    assert table["Patient ID"].tolist() == [1, 1, 2, 3]
    assert table["Patient ID"].dtype == np.int64
    assert all(table[label].dtype == np.uint8 for label in LABELS)


def test_read_table_encodes_findings_as_multi_hot_with_no_finding_all_zero(tmp_path):
    table = read_table(write_table(tmp_path / "t.csv", ROWS))
    assert label_row(table, "00000001_001.png") == {"Cardiomegaly": 1, "Emphysema": 1}
    assert label_row(table, "00000002_000.png") == {}
    assert label_row(table, "00000003_000.png") == {
        "Atelectasis": 1,
        "Hernia": 1,
        "Pneumothorax": 1,
    }


def test_read_table_names_line_and_image_of_an_unknown_label(tmp_path):
    rows = [*ROWS, ("00000004_000.png", "Effusion|Fracture", 4)]
    path = write_table(tmp_path / "t.csv", rows)
    with pytest.raises(CxrError, match=r"t\.csv: line 6 \(00000004_000\.png\).*'Fracture'"):
        read_table(path)


def test_read_table_rejects_an_empty_finding(tmp_path):
    path = write_table(tmp_path / "t.csv", [*ROWS, ("00000004_000.png", "", 4)])
    with pytest.raises(CxrError, match="line 6 .*empty Finding Labels"):
        read_table(path)


def test_read_table_rejects_a_duplicate_image_index(tmp_path):
    path = write_table(tmp_path / "t.csv", [*ROWS, ("00000002_000.png", "Edema", 2)])
    with pytest.raises(CxrError, match=r"t\.csv: duplicate Image Index '00000002_000\.png'"):
        read_table(path)


def test_read_table_names_a_missing_column(tmp_path):
    header = V2020_HEADER.replace("Patient ID", "Patient")
    path = write_table(tmp_path / "t.csv", ROWS, header=header)
    with pytest.raises(CxrError, match=r"t\.csv: missing column 'Patient ID'"):
        read_table(path)


def test_read_table_rejects_a_non_integer_patient_id(tmp_path):
    path = write_table(tmp_path / "t.csv", [*ROWS, ("00000004_000.png", "Edema", "P4")])
    with pytest.raises(CxrError, match=r"line 6 \(00000004_000\.png\): Patient ID 'P4'"):
        read_table(path)


@pytest.mark.parametrize("content", [b"", (V2020_HEADER + "\n").encode()])
def test_read_table_rejects_an_empty_csv(tmp_path, content):
    path = tmp_path / "Data_Entry_2017.csv"
    path.write_bytes(content)
    with pytest.raises(CxrError, match=r"Data_Entry_2017\.csv: (empty file|no data rows)"):
        read_table(path)


def test_find_table_prefers_the_2020_revision_and_accepts_gzip(tmp_path):
    write_table(tmp_path / "Data_Entry_2017.csv", ROWS)
    assert find_table(tmp_path) == tmp_path / "Data_Entry_2017.csv"
    write_table(tmp_path / "Data_Entry_2017_v2020.csv.gz", ROWS)
    assert find_table(tmp_path) == tmp_path / "Data_Entry_2017_v2020.csv.gz"


def test_find_table_names_the_folder_when_absent(tmp_path):
    with pytest.raises(CxrError, match=str(tmp_path)):
        find_table(tmp_path)


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"png")
    return path


def test_find_images_in_a_flat_images_folder(tmp_path):
    a = touch(tmp_path / "images" / "a.png")
    found, missing = find_images(tmp_path, ["a.png", "b.png"])
    assert found == {"a.png": a}
    assert missing == ["b.png"]


def test_find_images_across_nih_archive_folders(tmp_path):
    a = touch(tmp_path / "images_001" / "images" / "a.png")
    b = touch(tmp_path / "images_012" / "images" / "b.png")
    touch(tmp_path / "images_002" / "c.png")  # not inside an images/ subfolder: not NIH's layout
    found, missing = find_images(tmp_path, ["b.png", "a.png", "c.png"])
    assert found == {"b.png": b, "a.png": a}
    assert list(found) == ["b.png", "a.png"]
    assert missing == ["c.png"]


def test_find_images_without_any_image_folder_is_an_error(tmp_path):
    with pytest.raises(CxrError, match="no image folder"):
        find_images(tmp_path, ["a.png"])


@pytest.mark.parametrize("compressed", [False, True])
def test_read_official_lists_without_trailing_newline(tmp_path, compressed):
    for name, text in [("train_val_list.txt", "a.png\nb.png"), ("test_list.txt", "c.png")]:
        if compressed:
            (tmp_path / f"{name}.gz").write_bytes(gzip.compress(text.encode()))
        else:
            (tmp_path / name).write_text(text)
    assert read_official_lists(tmp_path) == ({"a.png", "b.png"}, {"c.png"})


def test_read_official_lists_names_the_missing_list(tmp_path):
    (tmp_path / "train_val_list.txt").write_text("a.png\n")
    with pytest.raises(CxrError, match="no test_list.txt"):
        read_official_lists(tmp_path)


def shared_folder(name: str) -> Path:
    folder = SHARED / name
    if not folder.is_dir():
        pytest.skip(f"real NIH data not available at {folder}")
    return folder


def test_read_table_reads_the_real_table_in_seconds():
    meta = shared_folder("nih14-meta")
    start = time.perf_counter()
    table = read_table(find_table(meta))
    seconds = time.perf_counter() - start
    assert len(table) == 112_120
    assert table["Patient ID"].nunique() == 30_805
    assert int(table["Hernia"].sum()) == 227
    assert int(table["Infiltration"].sum()) == 19_894
    assert seconds < 10, f"reading the real table took {seconds:.1f} s"
    train_val, test = read_official_lists(meta)
    assert (len(train_val), len(test)) == (86_524, 25_596)


def test_find_images_locates_every_image_of_the_real_sample():
    sample = shared_folder("nih14-sample")
    table = read_table(find_table(sample))
    found, missing = find_images(sample, table["Image Index"])
    assert missing == []
    assert len(found) == len(table) == 1_770
    assert all(path.name == name for name, path in found.items())
