"""PadChest (BIMCV) as published: the 160K label table and the numbered image folders (0/, 1/, ...).

`Labels` is a Python list written as text ("['pleural effusion', 'cardiomegaly']"): parsed with
`ast.literal_eval`, its terms trimmed and looked up whole in label_maps/padchest.csv (so
"pseudonodule" is not a "nodule"). Images without labels (`Labels` empty) are left out, logged.
Age is the study year minus the birth year. PadChest publishes no split. Its unreadable PNGs are
found by `prepare`'s header check like any other broken image, never listed here.
"""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from cxrfusion.data.options import PrepareOptions
from cxrfusion.data.sources.labelmap import encode_terms
from cxrfusion.data.sources.schema import new_table
from cxrfusion.errors import CxrError
from cxrfusion.tables import read_csv

log = logging.getLogger(__name__)

NAME = "padchest"
OFFICIAL_BY_DEFAULT = False
TABLE_GLOB = "PADCHEST_chest_x_ray_images_labels_160K*.csv*"
COLUMNS = [
    "ImageID",
    "ImageDir",
    "StudyDate_DICOM",
    "PatientID",
    "PatientBirth",
    "PatientSex_DICOM",
    "Projection",
    "Labels",
]
PROJECTIONS = {
    "PA": "PA",
    "AP": "AP",
    "AP_horizontal": "AP_SUPINE",
    "L": "LATERAL",
    "COSTAL": "UNKNOWN",
    "EXCLUDE": "UNKNOWN",
    "UNK": "UNKNOWN",
}
SEXES = {"M": "M", "F": "F"}


def find_table(root: Path) -> Path:
    found = sorted(root.glob(TABLE_GLOB))
    if not found:
        raise CxrError(
            f"{root}: no {TABLE_GLOB.replace('*.csv*', '*.csv')} (plain or .gz): not a PadChest folder"
        )
    return found[0]


def parse_terms(text: str, where: str) -> list[str]:
    """The trimmed, non-empty terms of one `Labels` cell.

    Raises:
        CxrError: the cell is not a Python list of strings.
    """
    try:
        terms = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        terms = None
    if not isinstance(terms, list) or not all(isinstance(t, str) for t in terms):
        raise CxrError(f"{where}: Labels {text!r} is not a list of terms")
    return [term.strip() for term in terms if term.strip()]


def _ages(raw: pd.DataFrame) -> pd.Series:
    study_year = pd.to_numeric(raw["StudyDate_DICOM"].str[:4], errors="coerce")
    birth_year = pd.to_numeric(raw["PatientBirth"], errors="coerce")
    age = study_year - birth_year
    return age.map(lambda years: "" if np.isnan(years) else str(int(years)))


def read_source(root: Path, options: PrepareOptions) -> pd.DataFrame:
    """Every labelled image, its terms mapped onto our labels."""
    csv = find_table(root)
    raw = read_csv(
        csv,
        "PadChest's label table",
        usecols=lambda c: c in COLUMNS,
        dtype=str,
        keep_default_na=False,
    )
    missing = [name for name in COLUMNS if name not in raw.columns]
    if missing:
        raise CxrError(f"{csv}: missing column {missing[0]!r}")
    unlabelled = raw["Labels"].str.strip().isin(("", "nan"))
    if unlabelled.any():
        log.warning("%s: %d images without Labels left out", csv, int(unlabelled.sum()))
    lines = np.flatnonzero(~unlabelled.to_numpy()) + 2
    raw = raw[~unlabelled].reset_index(drop=True)
    terms = [
        parse_terms(text, f"{csv}: line {line}")
        for text, line in zip(raw["Labels"], lines, strict=True)
    ]
    try:
        labels = encode_terms(NAME, terms)
    except KeyError as error:
        row = next(i for i, t in enumerate(terms) if error.args[0] in t)
        raise CxrError(
            f"{csv}: line {lines[row]}: term {error.args[0]!r} is not in label_maps/padchest.csv"
        ) from None
    views = raw["Projection"].str.strip().map(PROJECTIONS)
    if views.isna().any():
        row = int(np.flatnonzero(views.isna().to_numpy())[0])
        raise CxrError(
            f"{csv}: line {lines[row]}: unknown Projection {raw['Projection'].iloc[row]!r}"
        )
    names = raw["ImageDir"].str.strip() + "/" + raw["ImageID"].str.strip()
    return new_table(
        NAME,
        names,
        raw["PatientID"].str.strip(),
        labels,
        names.map(lambda name: str(root / name)),
        views,
        _ages(raw),
        raw["PatientSex_DICOM"].str.strip().map(SEXES),
    )
