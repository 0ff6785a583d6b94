"""The one table every source reader returns, and the function that checks it.

One row per image: `Image Index` (the image's path relative to the dataset folder, or NIH's file
name: unique), `Patient ID` (the dataset's own id, as text; `prepare` namespaces it by source when
needed), the 14 labels as float32 1 (present), 0 (absent) or NaN (unknown: the dataset has no such
finding, or the reader could not tell), `Patient Age` and `Patient Gender` (text, empty when
unknown), `View Position` (one of `VIEWS`; empty where the table records no view at all, as an
NIH table without the column: such images are never filtered by view), `source`, `Path` (the file) and, where the dataset
publishes a split, `official` (train, val or test).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cxrfusion.data.nih import IMAGE_COLUMN, PATIENT_COLUMN
from cxrfusion.data.options import VIEWS
from cxrfusion.errors import CxrError
from cxrfusion.labels import LABELS

AGE_COLUMN, SEX_COLUMN, VIEW_COLUMN = "Patient Age", "Patient Gender", "View Position"
SOURCE_COLUMN = "source"
PATH_COLUMN = "Path"
OFFICIAL_COLUMN = "official"
COLUMNS = (
    IMAGE_COLUMN,
    PATIENT_COLUMN,
    *LABELS,
    AGE_COLUMN,
    SEX_COLUMN,
    VIEW_COLUMN,
    SOURCE_COLUMN,
    PATH_COLUMN,
)


def new_table(
    source: str,
    images: pd.Series,
    patients: pd.Series,
    labels: np.ndarray,
    paths: pd.Series,
    views: pd.Series | None,
    ages: pd.Series | None = None,
    sexes: pd.Series | None = None,
) -> pd.DataFrame:
    """Assemble the schema's columns (index 0..n-1) from one reader's parts."""
    n = len(images)
    blank = pd.Series([""] * n)
    table = pd.DataFrame(
        {
            IMAGE_COLUMN: images.to_numpy(str),
            PATIENT_COLUMN: patients.to_numpy(),
        }
    )
    table[list(LABELS)] = np.asarray(labels, dtype=np.float32)
    table[AGE_COLUMN] = (blank if ages is None else ages).fillna("").to_numpy(str)
    table[SEX_COLUMN] = (blank if sexes is None else sexes).fillna("").to_numpy(str)
    table[VIEW_COLUMN] = (blank if views is None else views).to_numpy(str)
    table[SOURCE_COLUMN] = source
    table[PATH_COLUMN] = paths.to_numpy(str)
    return table


def check_table(table: pd.DataFrame, where: str) -> pd.DataFrame:
    """Refuse a reader's table that breaks the schema (a bug or a malformed dataset).

    Raises:
        CxrError: naming `where` and the first problem.
    """
    missing = [name for name in COLUMNS if name not in table.columns]
    if missing:
        raise CxrError(f"{where}: missing column {missing[0]!r}")
    if table.empty:
        raise CxrError(f"{where}: no images")
    duplicated = table[IMAGE_COLUMN].duplicated()
    if duplicated.any():
        raise CxrError(f"{where}: image {table[IMAGE_COLUMN][duplicated].iloc[0]!r} listed twice")
    labels = table[list(LABELS)].to_numpy(np.float32)
    if not (np.isnan(labels) | np.isin(labels, (0.0, 1.0))).all():
        raise CxrError(f"{where}: labels must be 0, 1 or missing")
    views = ~table[VIEW_COLUMN].isin((*VIEWS, ""))
    if views.any():
        raise CxrError(f"{where}: unknown view {table[VIEW_COLUMN][views].iloc[0]!r}")
    if (table[PATIENT_COLUMN].astype(str).str.strip() == "").any():
        raise CxrError(f"{where}: an image without a patient id")
    return table
