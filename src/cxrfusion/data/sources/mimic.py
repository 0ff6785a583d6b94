"""MIMIC-CXR-JPG as published: three tables (plain or .gz) and the `files/p10/p10000032/s.../` tree.

`mimic-cxr-2.0.0-chexpert.csv` labels each study with the CheXpert labeler (read as CheXpert's,
`chexpert.labeler_values`); every image of a study takes the study's labels. The metadata gives
each image (`dicom_id`) its study and `ViewPosition`; the split file is MIMIC's official
train/validate/test split, used by default. Images of a study without a label row are left out
(logged). MIMIC-CXR carries no age or sex (those are in MIMIC-IV).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from cxrfusion.data.nih import find_file
from cxrfusion.data.options import PrepareOptions
from cxrfusion.data.sources.chexpert import labeler_values
from cxrfusion.data.sources.schema import OFFICIAL_COLUMN, new_table
from cxrfusion.errors import CxrError
from cxrfusion.tables import read_csv

log = logging.getLogger(__name__)

NAME = "mimic"
OFFICIAL_BY_DEFAULT = True
PREFIX = "mimic-cxr-2.0.0-"
KEYS = ["subject_id", "study_id"]
SPLITS = {"train": "train", "validate": "val", "test": "test"}
VIEWS = {"PA": "PA", "AP": "AP", "LATERAL": "LATERAL", "LL": "LATERAL"}
ORIENTATION = "PatientOrientationCodeSequence_CodeMeaning"


def _table(root: Path, part: str, columns: list[str]) -> pd.DataFrame:
    path = find_file(root, [f"{PREFIX}{part}.csv"])
    if path is None:
        raise CxrError(f"{root}: no {PREFIX}{part}.csv (plain or .gz): not a MIMIC-CXR-JPG folder")
    table = read_csv(path, f"MIMIC-CXR's {part} table", dtype=str, keep_default_na=False)
    missing = [name for name in columns if name not in table.columns]
    if missing:
        raise CxrError(f"{path}: missing column {missing[0]!r}")
    table.attrs["path"] = path
    return table


def _views(metadata: pd.DataFrame) -> pd.Series:
    """ViewPosition onto our views; an AP film of a recumbent patient is AP_SUPINE."""
    views = metadata["ViewPosition"].str.strip().map(VIEWS).fillna("UNKNOWN")
    if ORIENTATION in metadata:
        supine = (views == "AP") & (metadata[ORIENTATION].str.strip() == "Recumbent")
        views = views.where(~supine, "AP_SUPINE")
    return views


def read_source(root: Path, options: PrepareOptions) -> pd.DataFrame:
    """Every image with its study's labels, its view and MIMIC's split."""
    labels = _table(root, "chexpert", KEYS)
    metadata = _table(root, "metadata", ["dicom_id", *KEYS, "ViewPosition"])
    split = _table(root, "split", ["dicom_id", "split"])
    values = pd.DataFrame(
        labeler_values(labels, labels.attrs["path"], "chexpert", options.uncertain)
    )
    studies = pd.concat([labels[KEYS], values], axis=1)
    images = metadata.merge(studies, on=KEYS, how="inner", validate="many_to_one")
    if len(images) < len(metadata):
        log.warning(
            "%s: %d images of studies without labels left out", root, len(metadata) - len(images)
        )
    images = images.merge(split[["dicom_id", "split"]], on="dicom_id", how="left")
    unknown = ~images["split"].isin(SPLITS)
    if unknown.any():
        raise CxrError(
            f"{split.attrs['path']}: image {images['dicom_id'][unknown].iloc[0]} has no split (train, validate or test)"
        )
    names = (
        "files/p" + images["subject_id"].str[:2] + "/p" + images["subject_id"]
        + "/s" + images["study_id"] + "/" + images["dicom_id"] + ".jpg"
    )  # fmt: skip
    table = new_table(
        NAME,
        names,
        images["subject_id"],
        images[values.columns].to_numpy(),
        names.map(lambda name: str(root / name)),
        _views(images),
    )
    return table.assign(**{OFFICIAL_COLUMN: images["split"].map(SPLITS).to_numpy()})
