"""AUC by subgroup: sex, age band and view position, from the NIH table's columns in split.csv.

A model can be good on average and poor for a group (older patients, AP films of bed-bound
patients); these tables show it. A split.csv written before these columns were kept has none, and
the subgroups are then skipped with a note.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from cxrfusion.labels import LABELS
from cxrfusion.stats.metrics import json_number, macro_auc, per_class_auc

AGE_BANDS = ((0, 40, "<40"), (40, 60, "40-59"), (60, 80, "60-79"), (80, 121, "80+"))
# NIH's table holds a few impossible ages (over 400); ages above this are left unknown.
MAX_AGE = 120
COLUMNS = {"sex": "Patient Gender", "age": "Patient Age", "view": "View Position"}


def age_band(ages: pd.Series) -> pd.Series:
    """Age band of each age ("58", "058Y" and 58 all read as 58); missing when unreadable."""
    years = pd.to_numeric(ages.astype(str).str.extract(r"(\d+)")[0], errors="coerce")
    years = years.where(years <= MAX_AGE)
    bands = pd.Series(pd.NA, index=ages.index, dtype=object)
    for low, high, name in AGE_BANDS:
        bands[(years >= low) & (years < high)] = name
    return bands


def subgroup_columns(rows: pd.DataFrame) -> dict[str, pd.Series]:
    """The grouping of each image by sex, age band and view, for the columns `rows` has."""
    groups = {}
    if COLUMNS["sex"] in rows:
        groups["sex"] = rows[COLUMNS["sex"]].astype("string").str.upper()
    if COLUMNS["age"] in rows:
        groups["age"] = age_band(rows[COLUMNS["age"]])
    if COLUMNS["view"] in rows:
        groups["view"] = rows[COLUMNS["view"]].astype("string").str.upper()
    return groups


def subgroup_aucs(
    rows: pd.DataFrame, y_true: np.ndarray, y_prob: np.ndarray, labels: Sequence[str] = LABELS
) -> dict:
    """Per subgroup: images, patients, macro AUC and per-class AUC (null where undefined).

    Args:
        rows: the evaluated split.csv rows, in prediction order (needs `Patient ID`).
        y_true, y_prob: (N, C) truth and probabilities of those rows.
        labels: one name per column.

    Returns:
        {"sex": {"F": {...}, "M": {...}}, "age": {"<40": ...}, "view": {"AP": ..., "PA": ...}},
        each entry with `images`, `patients`, `macro_auc` and `auc` {label: value}; an empty
        dict when the split has none of the columns.
    """
    result: dict[str, dict] = {}
    patients = rows["Patient ID"].to_numpy()
    for kind, groups in subgroup_columns(rows).items():
        result[kind] = {}
        present = sorted(groups.dropna().unique())
        order = [band for _, _, band in AGE_BANDS] if kind == "age" else present
        for name in order:
            member = groups.eq(name).fillna(False).to_numpy(dtype=bool)
            if not member.any():
                continue
            aucs = per_class_auc(y_true[member], y_prob[member])
            result[kind][str(name)] = {
                "images": int(member.sum()),
                "patients": int(len(np.unique(patients[member]))),
                "macro_auc": json_number(macro_auc(aucs)),
                "auc": {label: json_number(a) for label, a in zip(labels, aucs, strict=True)},
            }
    return result
