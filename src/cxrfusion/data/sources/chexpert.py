"""CheXpert (Stanford) as published: `train.csv` and `valid.csv` in the dataset folder.

The `Path` column starts with the folder's own name (`CheXpert-v1.0-small/train/patient00001/
study1/view1_frontal.jpg`): it is the image's name here, and the file is the rest of it inside the
folder, whatever the folder is called. The patient is the
`patientNNNNN` part of the path. Findings follow the CheXpert labeler's convention, shared with
MIMIC-CXR (`labeler_values`): 1 positive, 0 negative, -1 uncertain, blank not mentioned (a
negative). valid.csv (radiologist-labelled, patients disjoint from train.csv) is the official test
split with `--split official`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxrfusion.data.nih import find_file
from cxrfusion.data.options import PrepareOptions
from cxrfusion.data.sources.labelmap import covered, load_map
from cxrfusion.data.sources.schema import OFFICIAL_COLUMN, new_table
from cxrfusion.errors import CxrError
from cxrfusion.labels import LABEL_INDEX, NUM_LABELS
from cxrfusion.tables import read_csv

NAME = "chexpert"
OFFICIAL_BY_DEFAULT = False  # valid.csv is the test split only when asked (--split official)
TABLES = {"train.csv": "train", "valid.csv": "test"}
NO_FINDING = "No Finding"
UNCERTAIN = -1.0
# The labeler writes 1.0, 0.0, -1.0 or nothing; blank means "not mentioned", a negative.
VALUES = {"1.0": 1.0, "1": 1.0, "0.0": 0.0, "0": 0.0, "-1.0": UNCERTAIN, "-1": UNCERTAIN, "": 0.0}
UNCERTAIN_AS = {"mask": np.nan, "zeros": 0.0, "ones": 1.0}
SEXES = {"Male": "M", "Female": "F"}


def labeler_values(raw: pd.DataFrame, csv: Path, dataset: str, uncertain: str) -> np.ndarray:
    """(n, 14) float32 labels from the CheXpert labeler's columns (CheXpert, MIMIC-CXR).

    Args:
        raw: the label table as text (blank cells empty).
        csv: the file, for messages.
        dataset: whose label map to use ("chexpert"; MIMIC shares it).
        uncertain: how -1 reads: "mask" (NaN), "zeros" or "ones".

    Raises:
        CxrError: a missing finding column, a value other than 1, 0, -1 or blank, or an image
            marked No Finding with one of our findings present or uncertain.
    """
    mapping = load_map(dataset)
    missing = [term for term in mapping if term not in raw.columns]
    if missing:
        raise CxrError(f"{csv}: missing column {missing[0]!r}")
    out = np.full((len(raw), NUM_LABELS), np.nan, dtype=np.float32)
    ours = np.zeros(len(raw), dtype=bool)
    for term, labels in mapping.items():
        values = raw[term].str.strip().map(VALUES)
        if values.isna().any():
            row = int(np.flatnonzero(values.isna().to_numpy())[0])
            raise CxrError(
                f"{csv}: line {row + 2}: {term} is {raw[term].iloc[row]!r}, not 1, 0, -1 or blank"
            )
        values = values.to_numpy(np.float32)
        if labels:
            ours |= values != 0
        for label in labels:
            out[:, LABEL_INDEX[label]] = np.where(
                values == UNCERTAIN, UNCERTAIN_AS[uncertain], values
            )
    no_finding = raw[NO_FINDING].str.strip().map(VALUES).to_numpy() == 1.0
    clash = np.flatnonzero(no_finding & ours)
    if clash.size:
        raise CxrError(
            f"{csv}: line {clash[0] + 2}: No Finding with one of our findings present or uncertain"
        )
    out[:, ~covered(dataset)] = np.nan
    return out


def _views(raw: pd.DataFrame) -> pd.Series:
    """Frontal + AP/PA to PA or AP (CheXpert does not say supine), Lateral to LATERAL."""
    frontal = raw["Frontal/Lateral"].str.strip() == "Frontal"
    ap_pa = raw["AP/PA"].str.strip()
    views = ap_pa.where(ap_pa.isin(("AP", "PA")), "UNKNOWN")
    return views.where(frontal, "LATERAL").where(
        raw["Frontal/Lateral"].str.strip().isin(("Frontal", "Lateral")), "UNKNOWN"
    )


def _read(csv: Path, root: Path, uncertain: str) -> pd.DataFrame:
    raw = read_csv(csv, "a CheXpert label table", dtype=str, keep_default_na=False)
    for column in ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"):
        if column not in raw.columns:
            raise CxrError(f"{csv}: missing column {column!r}")
    patients = raw["Path"].str.extract(r"/(patient\d+)/", expand=False)
    if patients.isna().any():
        row = int(np.flatnonzero(patients.isna().to_numpy())[0])
        raise CxrError(f"{csv}: line {row + 2}: no patientNNNNN in path {raw['Path'].iloc[row]!r}")
    return new_table(
        NAME,
        raw["Path"],
        patients,
        labeler_values(raw, csv, NAME, uncertain),
        raw["Path"].map(lambda path: str(root.joinpath(*Path(path).parts[1:]))),
        _views(raw),
        raw["Age"],
        raw["Sex"].str.strip().map(SEXES),
    )


def read_source(root: Path, options: PrepareOptions) -> pd.DataFrame:
    """train.csv (required) and valid.csv (when present) in the schema, with `official`."""
    parts = []
    for name, split in TABLES.items():
        csv = find_file(root, [name])
        if csv is None and split == "train":
            raise CxrError(f"{root}: no train.csv (plain or .gz): not a CheXpert folder")
        if csv is not None:
            parts.append(_read(csv, root, options.uncertain).assign(**{OFFICIAL_COLUMN: split}))
    return pd.concat(parts, ignore_index=True)
