"""The NIH ChestX-ray14 dataset on disk: its label table, its image folders, its official lists."""

from __future__ import annotations

import gzip
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from cxrfusion.errors import CxrError
from cxrfusion.labels import LABELS, multi_hot
from cxrfusion.tables import read_csv

logger = logging.getLogger(__name__)

TABLE_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"
IMAGE_COLUMN = "Image Index"
PATIENT_COLUMN = "Patient ID"
FINDINGS_COLUMN = "Finding Labels"
REQUIRED_COLUMNS = (IMAGE_COLUMN, FINDINGS_COLUMN, PATIENT_COLUMN)
# Kept as text when the table has them, for subgroup results (sex, age band, view position).
DEMOGRAPHIC_COLUMNS = ("Patient Age", "Patient Gender", "View Position")


def find_file(data_dir: Path, names: Iterable[str]) -> Path | None:
    """The first of `names` (each tried plain, then gzipped) that exists in `data_dir`."""
    for name in names:
        for candidate in (data_dir / name, data_dir / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def find_table(data_dir: Path) -> Path:
    """Locate the label table in an NIH folder, preferring NIH's 2020 revision.

    Args:
        data_dir: the dataset folder as NIH ships it; the table may be plain or `.gz`.

    Raises:
        CxrError: when none of the known table names is there.
    """
    path = find_file(Path(data_dir), TABLE_NAMES)
    if path is None:
        raise CxrError(f"{data_dir}: no label table ({' or '.join(TABLE_NAMES)}, plain or .gz)")
    return path


def read_table(csv_path: Path) -> pd.DataFrame:
    """Read an NIH label table into image names, patients and a 14-column multi-hot.

    Both published forms are accepted: the 2017 file (trailing empty column) and the 2020
    revision; plain or gzipped. `Image Index`, `Finding Labels` and `Patient ID` are required;
    `DEMOGRAPHIC_COLUMNS` are carried along as text when present.

    Args:
        csv_path: the `Data_Entry_2017*.csv[.gz]` file.

    Returns:
        Columns `Image Index` (str), `Patient ID` (int64), the labels in `LABELS` order
        (uint8 0/1), then those of `DEMOGRAPHIC_COLUMNS` the file has (str, as written);
        rows in file order, index 0..n-1.

    Raises:
        CxrError: unreadable or empty file, a missing column, an unknown label, a duplicate
            image name or a non-integer patient id (one line, naming the file).
    """
    csv_path = Path(csv_path)
    raw = _read_required_columns(csv_path)
    images = raw[IMAGE_COLUMN]
    duplicated = images.duplicated()
    if duplicated.any():
        raise CxrError(f"{csv_path}: duplicate Image Index {images[duplicated].iloc[0]!r}")
    table = pd.DataFrame({IMAGE_COLUMN: images, PATIENT_COLUMN: _patient_ids(raw, csv_path)})
    labels = pd.DataFrame(_encode_findings(raw, csv_path), columns=list(LABELS))
    demographics = raw[[name for name in DEMOGRAPHIC_COLUMNS if name in raw.columns]]
    return pd.concat([table, labels, demographics], axis=1)


def _read_required_columns(csv_path: Path) -> pd.DataFrame:
    """The required (and demographic) columns as strings; CxrError for a bad file."""
    raw = read_csv(
        csv_path,
        "the NIH label table",
        usecols=lambda name: name in REQUIRED_COLUMNS + DEMOGRAPHIC_COLUMNS,
        dtype=str,
        keep_default_na=False,
    )
    missing = [name for name in REQUIRED_COLUMNS if name not in raw.columns]
    if missing:
        raise CxrError(f"{csv_path}: missing column {missing[0]!r}")
    if raw.empty:
        raise CxrError(f"{csv_path}: no data rows, expected the NIH label table")
    return raw.reset_index(drop=True)


def _line(row: int) -> int:
    """File line of data row `row` (line 1 is the header)."""
    return row + 2


def _patient_ids(raw: pd.DataFrame, csv_path: Path) -> pd.Series:
    """`Patient ID` as int64; CxrError naming the first row that is not a whole number."""
    ids = raw[PATIENT_COLUMN].str.strip()
    bad = ~ids.str.fullmatch(r"\d+")
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise CxrError(
            f"{csv_path}: line {_line(row)} ({raw[IMAGE_COLUMN].iloc[row]}): "
            f"Patient ID {raw[PATIENT_COLUMN].iloc[row]!r} is not an integer"
        )
    return ids.astype(np.int64)


def _encode_findings(raw: pd.DataFrame, csv_path: Path) -> np.ndarray:
    """(n, 14) uint8 multi-hot; each distinct `Finding Labels` string is encoded once."""
    codes, uniques = pd.factorize(raw[FINDINGS_COLUMN])
    encoded = []
    for code, findings in enumerate(uniques):
        try:
            if not findings.strip():
                raise ValueError("empty Finding Labels")
            encoded.append(multi_hot(findings))
        except ValueError as error:
            row = int(np.flatnonzero(codes == code)[0])
            raise CxrError(
                f"{csv_path}: line {_line(row)} ({raw[IMAGE_COLUMN].iloc[row]}): {error}"
            ) from None
    return np.stack(encoded)[codes]


def _image_dirs(data_dir: Path) -> list[Path]:
    """Image folders in NIH order: flat `images/` first, then `images_001/images`, ..."""
    nested = sorted(p / "images" for p in data_dir.glob("images_*") if (p / "images").is_dir())
    flat = data_dir / "images"
    return ([flat] if flat.is_dir() else []) + nested


def find_images(data_dir: Path, names: Iterable[str]) -> tuple[dict[str, Path], list[str]]:
    """Locate images by file name in an NIH folder, listing each image folder once.

    Args:
        data_dir: the dataset folder; PNGs lie flat in `images/` or in `images_*/images/`
            (as in NIH's 12 archives). A name found in several folders takes the first.
        names: the `Image Index` values to locate.

    Returns:
        The found names mapped to their paths (in `names` order) and the missing names.

    Raises:
        CxrError: when `data_dir` holds no image folder at all.
    """
    data_dir = Path(data_dir)
    folders = _image_dirs(data_dir)
    if not folders:
        raise CxrError(f"{data_dir}: no image folder (images/ or images_*/images/)")
    available: dict[str, Path] = {}
    for folder in folders:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_file() and entry.name not in available:
                    available[entry.name] = folder / entry.name
    found: dict[str, Path] = {}
    missing: list[str] = []
    for name in names:
        if name in available:
            found[name] = available[name]
        else:
            missing.append(name)
    logger.debug(
        "found %d images in %d folders, %d missing", len(found), len(folders), len(missing)
    )
    return found, missing


def _read_names(path: Path) -> set[str]:
    """One file name per line (plain or gzipped; the last line may lack its newline)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            return {line.strip() for line in handle if line.strip()}
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise CxrError(f"{path}: unreadable list ({error})") from None


def read_official_lists(data_dir: Path) -> tuple[set[str], set[str]]:
    """NIH's official patient-wise split: the train_val and test image names.

    Args:
        data_dir: folder holding `train_val_list.txt` and `test_list.txt` (plain or `.gz`).

    Returns:
        (train_val names, test names).

    Raises:
        CxrError: when a list is absent or unreadable.
    """
    data_dir = Path(data_dir)
    lists = []
    for name in (TRAIN_VAL_LIST, TEST_LIST):
        path = find_file(data_dir, [name])
        if path is None:
            raise CxrError(f"{data_dir}: no {name} (plain or .gz), needed for the official split")
        lists.append(_read_names(path))
    return lists[0], lists[1]
