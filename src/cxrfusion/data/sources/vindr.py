"""VinDr-CXR (VinBigData) as published: `train.csv`, one row per reader (`rad_id`) and finding
(a reader who saw nothing writes one "No finding" row), and the DICOMs in `train/`.

Each training image was read by three radiologists who often disagree; `--readers` says how their
reports combine per finding: majority (default: more than half of the image's readers), union (any
reader) or any:N (at least N readers). The test set's labels, where present (`test.csv`, same
columns, images in `test/`), are the readers' consensus: taken as they are, as the official test
split. VinDr publishes no patient ids: each image is its own patient. The images are frontal
(posteroanterior) films of adults, as the dataset's paper says: the view is PA.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxrfusion.data.nih import find_file
from cxrfusion.data.options import PrepareOptions
from cxrfusion.data.sources.labelmap import encode_terms
from cxrfusion.data.sources.schema import OFFICIAL_COLUMN, new_table
from cxrfusion.errors import CxrError
from cxrfusion.labels import LABELS
from cxrfusion.tables import read_csv

NAME = "vindr"
OFFICIAL_BY_DEFAULT = True  # when the test set's consensus labels are there
TABLES = {"train.csv": "train", "test.csv": "test"}
EXTENSIONS = (".dicom", ".dcm")


def _read(csv: Path) -> pd.DataFrame:
    raw = read_csv(csv, "VinDr-CXR's annotation table", dtype=str, keep_default_na=False)
    for column in ("image_id", "class_name", "rad_id"):
        if column not in raw.columns:
            raise CxrError(f"{csv}: missing column {column!r}")
    raw["class_name"] = raw["class_name"].str.strip()
    return raw


def _encode(raw: pd.DataFrame, csv: Path) -> pd.DataFrame:
    """One row per (image, reader, finding) as our labels, the terms mapped once each."""
    try:
        findings = encode_terms(NAME, [[term] for term in raw["class_name"]])
    except KeyError as error:
        row = int(np.flatnonzero((raw["class_name"] == error.args[0]).to_numpy())[0])
        raise CxrError(
            f"{csv}: line {row + 2}: class {error.args[0]!r} is not in label_maps/vindr.csv"
        ) from None
    return pd.concat(
        [raw[["image_id", "rad_id"]], pd.DataFrame(findings, columns=list(LABELS))], axis=1
    )


def combine_readers(raw: pd.DataFrame, csv: Path, options: PrepareOptions) -> pd.DataFrame:
    """Per image: a label is positive when at least `options.min_readers(readers)` of the
    image's readers reported it (a reader's several boxes of one finding count once)."""
    findings = _encode(raw, csv)
    per_reader = findings.groupby(["image_id", "rad_id"], sort=False)[list(LABELS)].max()
    votes = per_reader.groupby(level="image_id", sort=False).sum(min_count=1)
    readers = per_reader.groupby(level="image_id", sort=False).size()
    needed = np.array([options.min_readers(int(n)) for n in readers])
    return (votes.ge(needed, axis=0).astype(np.float32)).where(votes.notna())


def _consensus(raw: pd.DataFrame, csv: Path) -> pd.DataFrame:
    """The test set's consensus labels: a finding listed for the image is present."""
    return _encode(raw, csv).groupby("image_id", sort=False)[list(LABELS)].max()


def _image(root: Path, folder: str, image_id: str) -> tuple[str, Path]:
    """The image's name and file (`.dicom` as published, `.dcm` accepted)."""
    for extension in EXTENSIONS:
        name = f"{folder}/{image_id}{extension}"
        if (root / name).is_file():
            return name, root / name
    name = f"{folder}/{image_id}{EXTENSIONS[0]}"
    return name, root / name


def read_source(root: Path, options: PrepareOptions) -> pd.DataFrame:
    """The training images (readers combined) and, when present, the consensus test set."""
    parts = []
    for table, split in TABLES.items():
        csv = find_file(root, [table])
        if csv is None and split == "train":
            raise CxrError(f"{root}: no train.csv (plain or .gz): not a VinDr-CXR folder")
        if csv is None:
            continue
        raw = _read(csv)
        labels = combine_readers(raw, csv, options) if split == "train" else _consensus(raw, csv)
        files = [_image(root, split, image_id) for image_id in labels.index]
        names = pd.Series([name for name, _ in files])
        part = new_table(
            NAME,
            names,
            pd.Series(labels.index),
            labels.to_numpy(),
            pd.Series([str(path) for _, path in files]),
            pd.Series(["PA"] * len(labels)),
        )
        parts.append(part.assign(**{OFFICIAL_COLUMN: split}))
    return pd.concat(parts, ignore_index=True)
