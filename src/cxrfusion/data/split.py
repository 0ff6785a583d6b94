"""Patient-wise train/val/test splits of the NIH table: made once, saved, reproducible byte for byte.

No patient is ever in two splits: image-level splits leak a patient's other radiographs into the
test set and inflate AUC. Patients are stratified with iterative multi-label stratification
(Sechidis et al. 2011, the `iterstrat` package) so that every pathology keeps its prevalence.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

from cxrfusion.atomic import write_atomic
from cxrfusion.data.nih import DEMOGRAPHIC_COLUMNS, IMAGE_COLUMN, PATIENT_COLUMN
from cxrfusion.errors import CxrError
from cxrfusion.labels import LABELS

logger = logging.getLogger(__name__)

SPLIT_COLUMN = "split"
SOURCE_COLUMN = "source"
OFFICIAL_COLUMN = "official"
SPLITS = ("train", "val", "test")
SPLIT_FILE = "split.csv"
SUMMARY_JSON = "split_summary.json"
SUMMARY_MD = "split_summary.md"
# A patient's stratification features: for each label, "has at least t positive images", and
# "has at least t images". t = 1 alone is the plain union of labels; the higher levels spread
# patients with many positive images over the splits, which keeps *image* prevalence (what
# training and AUC see) close to the overall one, not only patient prevalence. On the real table
# with all patients (20 seeds) this takes the worst relative prevalence error from 26 % to 8 %
# on average (the worst seed: 42 % to 14 %).
LABEL_LEVELS = (1, 2, 4, 8, 16)
SIZE_LEVELS = (2, 4, 8, 16, 32)

Assigner = Callable[
    [pd.DataFrame, float, float, float, np.random.Generator, tuple | None], pd.Series
]


def _check_fraction(name: str, value: float, allow_one: bool = False) -> None:
    upper_ok = value <= 1 if allow_one else value < 1
    if not (value > 0 and upper_ok):
        interval = "(0, 1]" if allow_one else "(0, 1)"
        raise CxrError(f"{name} must be in {interval}, got {value}")


def _patient_features(table: pd.DataFrame) -> pd.DataFrame:
    """One boolean row per patient (sorted by id): label and size levels, see `LABEL_LEVELS`."""
    grouped = table.groupby(PATIENT_COLUMN, sort=True)
    positives = grouped[list(LABELS)].sum()
    sizes = grouped.size()
    columns = {f"{label}>={t}": positives[label] >= t for t in LABEL_LEVELS for label in LABELS}
    columns |= {f"images>={t}": sizes >= t for t in SIZE_LEVELS}
    return pd.DataFrame(columns)


def _stratified_holdout(features: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of a held-out `fraction` of rows, iteratively stratified on `features`."""
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    _, held_out = next(splitter.split(np.zeros(len(features)), features))
    mask = np.zeros(len(features), dtype=bool)
    mask[held_out] = True
    return mask


def _draw_seed(rng: np.random.Generator) -> int:
    """An int seed for iterstrat (which takes RandomState seeds) drawn from our Generator."""
    return int(rng.integers(2**31 - 1))


def _carve_val(table: pd.DataFrame, fraction: float, rng: np.random.Generator) -> dict[int, str]:
    """Patients of `table` to "train" or "val" (`fraction` of the patients), stratified."""
    features = _patient_features(table)
    if len(features) < 2:
        raise CxrError(f"too few patients ({len(features)}) to carve out a validation split")
    is_val = _stratified_holdout(features.to_numpy(), fraction, _draw_seed(rng))
    return dict(zip(features.index, np.where(is_val, "val", "train"), strict=True))


def _assign_iterative(
    table: pd.DataFrame,
    patient_fraction: float,
    val: float,
    test: float,
    rng: np.random.Generator,
    official_lists: tuple | None,
) -> pd.Series:
    """Split names per row: a random patient subset, then test and val held out, stratified."""
    patients = np.sort(table[PATIENT_COLUMN].unique())
    keep = max(1, round(patient_fraction * len(patients)))
    chosen = rng.permutation(patients)[:keep]
    subset = table[table[PATIENT_COLUMN].isin(chosen)]
    features = _patient_features(subset)
    if len(features) < 3:
        raise CxrError(f"too few patients ({len(features)}) for a train/val/test split")
    is_test = _stratified_holdout(features.to_numpy(), test, _draw_seed(rng))
    by_patient = dict.fromkeys(features.index[is_test], "test")
    rest = subset[~subset[PATIENT_COLUMN].isin(by_patient)]
    by_patient |= _carve_val(rest, val / (1 - test), rng)
    return table[PATIENT_COLUMN].map(by_patient)


def _assign_official(
    table: pd.DataFrame,
    patient_fraction: float,
    val: float,
    test: float,
    rng: np.random.Generator,
    official_lists: tuple | None,
) -> pd.Series:
    """Split names per row from NIH's lists; val is carved from train_val by patient."""
    if official_lists is None:
        raise CxrError("split 'official' needs train_val_list.txt and test_list.txt")
    train_val_names, test_names = official_lists
    in_test = table[IMAGE_COLUMN].isin(test_names)
    in_train_val = table[IMAGE_COLUMN].isin(train_val_names)
    both = table[IMAGE_COLUMN][in_test & in_train_val]
    if len(both):
        raise CxrError(f"test_list.txt: {both.iloc[0]} is also in train_val_list.txt")
    shared = set(table[PATIENT_COLUMN][in_test]) & set(table[PATIENT_COLUMN][in_train_val])
    if shared:
        raise CxrError(
            f"test_list.txt: patient {min(shared)} also has images in train_val_list.txt "
            f"({len(shared)} patients shared)"
        )
    unlisted = int((~in_test & ~in_train_val).sum())
    if unlisted:
        logger.warning("%d images are in neither official list: left out of the split", unlisted)
    train_val = table[in_train_val]
    # `val` is a share of all listed images, as in the iterative split, so the same flag means
    # the same validation size under both methods.
    val_of_train_val = val * (in_test.sum() + len(train_val)) / max(len(train_val), 1)
    if not 0 < val_of_train_val < 1:
        raise CxrError(f"val={val} leaves no training images in train_val_list.txt")
    by_patient = _carve_val(train_val, val_of_train_val, rng)
    names = table[PATIENT_COLUMN].map(by_patient).where(in_train_val)
    return names.where(~in_test, "test")


def _assign_published(
    table: pd.DataFrame,
    patient_fraction: float,
    val: float,
    test: float,
    rng: np.random.Generator,
    official_lists: tuple | None,
) -> pd.Series:
    """The split a dataset publishes in its `official` column (MIMIC's), kept as it is."""
    names = table[OFFICIAL_COLUMN]
    spread = table.groupby(PATIENT_COLUMN)[OFFICIAL_COLUMN].nunique()
    if (spread > 1).any():
        raise CxrError(
            f"the published split puts patient {spread.index[spread > 1][0]} in two splits"
        )
    return names


METHODS: dict[str, Assigner] = {
    "iterative": _assign_iterative,
    "official": _assign_official,
    "published": _assign_published,
}


def make_split(
    table: pd.DataFrame,
    method: str = "iterative",
    patient_fraction: float = 0.5,
    val: float = 0.1,
    test: float = 0.2,
    seed: int = 0,
    official_lists: tuple[set[str], set[str]] | None = None,
) -> pd.DataFrame:
    """Split a table by patient into train/val/test; same inputs, same split.

    Args:
        table: `read_table`'s frame or a source's (`Image Index`, `Patient ID`, the 14 labels
            0/1/NaN, and any of `DEMOGRAPHIC_COLUMNS` and `source`, carried into the split
            unchanged; "published" reads its `official` column).
        method: "iterative" (the report's: a random patient subset, then iterative multi-label
            stratification of patients) or "official" (NIH's test_list.txt is the test split,
            exactly; val is carved by patient from train_val_list.txt, stratified) or
            "published" (the table's `official` column as it is: MIMIC's split).
        patient_fraction: share of patients kept before splitting, in (0, 1]; the report used
            0.5 to halve training cost. Ignored by "official", whose test split stays exact.
        val: validation share of the images, in (0, 1). For "official" it is still a share of
            all listed images (so 0.1 gives about 11k images whichever the method).
        test: test share of the images, in (0, 1), val + test < 1. Ignored by "official".
        seed: seeds the patient subset and the stratification's tie-breaking.
        official_lists: (train_val names, test names) from `read_official_lists`; needed by
            "official". Images in neither list are left out with a warning.

    Returns:
        Columns `Image Index`, `Patient ID`, `split`, the 14 labels (float32, NaN where
        unknown), then the table's demographic columns and `source`; the kept rows in table order. Shares are met per patient, so image shares are close, not exact.

    Raises:
        CxrError: for a bad method or fraction, too few patients, or inconsistent lists.
    """
    if method not in METHODS:
        raise CxrError(f"split method must be one of {', '.join(METHODS)}, got {method!r}")
    _check_fraction("patient_fraction", patient_fraction, allow_one=True)
    _check_fraction("val", val)
    _check_fraction("test", test)
    if val + test >= 1:
        raise CxrError(f"val + test must be below 1, got {val} + {test}")
    rng = np.random.default_rng(seed)
    names = METHODS[method](table, patient_fraction, val, test, rng, official_lists)
    kept = names.notna()
    split = table.loc[kept, [IMAGE_COLUMN, PATIENT_COLUMN]].copy()
    split[SPLIT_COLUMN] = names[kept].astype(str)
    optional = (*DEMOGRAPHIC_COLUMNS, SOURCE_COLUMN)
    carried = [*LABELS, *(name for name in optional if name in table.columns)]
    split = pd.concat([split, table.loc[kept, carried]], axis=1).reset_index(drop=True)
    split[list(LABELS)] = split[list(LABELS)].astype(np.float32)
    counts = split[SPLIT_COLUMN].value_counts()
    logger.info("%s split: %s images", method, ", ".join(f"{s} {counts.get(s, 0)}" for s in SPLITS))
    return split


def write_split(split: pd.DataFrame, out: Path) -> Path:
    """Save a split as `out/split.csv`, atomically; identical splits give identical bytes.

    Args:
        split: `make_split`'s frame; labels are written 0, 1 or empty (unknown).
        out: the run or cache folder (created if needed).
    """
    labels = split[list(LABELS)].astype("Int8")
    text = split.assign(**labels).to_csv(index=False, lineterminator="\n")
    return write_atomic(Path(out) / SPLIT_FILE, text.encode("utf-8"))


def read_split(path: Path) -> pd.DataFrame:
    """Load a saved `split.csv` back into `make_split`'s frame.

    Labels are float32 0/1, an empty cell NaN (unknown). `Patient ID` is an integer where every
    id is one (NIH), else text (namespaced by source: `chexpert:patient00001`). The demographic
    columns and `source` are optional (an older split.csv has none); they are read as text, an
    empty cell as missing.

    Raises:
        CxrError: when the file is missing, lacks a column, names an unknown split or holds a
            label other than 0, 1 or empty.
    """
    columns = [IMAGE_COLUMN, PATIENT_COLUMN, SPLIT_COLUMN, *LABELS]
    optional = (*DEMOGRAPHIC_COLUMNS, SOURCE_COLUMN)
    dtypes = {IMAGE_COLUMN: str, PATIENT_COLUMN: str, SPLIT_COLUMN: str}
    dtypes |= dict.fromkeys(optional, str) | dict.fromkeys(LABELS, np.float32)
    try:
        split = pd.read_csv(path, dtype=dtypes)
    except FileNotFoundError:
        raise CxrError(f"{path}: split file not found") from None
    except (ValueError, pd.errors.ParserError) as error:
        raise CxrError(f"{path}: not a split file ({str(error).splitlines()[0]})") from None
    missing = [name for name in columns if name not in split.columns]
    if missing:
        raise CxrError(f"{path}: missing column {missing[0]!r}")
    unknown = set(split[SPLIT_COLUMN]) - set(SPLITS)
    if unknown:
        raise CxrError(f"{path}: unknown split {sorted(unknown)[0]!r}")
    labels = split[list(LABELS)].to_numpy()
    if not (np.isnan(labels) | np.isin(labels, (0.0, 1.0))).all():
        raise CxrError(f"{path}: labels must be 0, 1 or empty")
    patients = split[PATIENT_COLUMN]
    if patients.str.fullmatch(r"\d+").all():
        split[PATIENT_COLUMN] = patients.astype(np.int64)
    return split[columns + [name for name in optional if name in split.columns]]


def _describe(part: pd.DataFrame, total_images: int) -> dict:
    positives = part[list(LABELS)].sum()
    known = part[list(LABELS)].notna().sum()
    images = len(part)
    return {
        "images": images,
        "patients": int(part[PATIENT_COLUMN].nunique()),
        "image_share": round(images / total_images, 6) if total_images else 0.0,
        "labels": {
            label: {
                "positives": int(positives[label]),
                "prevalence": round(float(positives[label]) / known[label], 6)
                if known[label]
                else 0.0,
                "unknown": int(images - known[label]),
            }
            for label in LABELS
        },
    }


def summarise(split: pd.DataFrame) -> dict:
    """Images, patients, image share and per-label positives/prevalence/unknown of each split.

    Args:
        split: `make_split`'s frame.

    Returns:
        `{"train": {...}, "val": {...}, "test": {...}, "overall": {...}}`, each with `images`,
        `patients`, `image_share` and `labels: {name: {"positives", "prevalence",
        "unknown"}}`; prevalence is among the images whose label is known.
    """
    total = len(split)
    summary = {name: _describe(split[split[SPLIT_COLUMN] == name], total) for name in SPLITS}
    summary["overall"] = _describe(split, total)
    return summary


def _markdown(summary: dict) -> str:
    columns = [*SPLITS, "overall"]
    lines = [
        "| | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
        "| images | " + " | ".join(f"{summary[c]['images']:,}" for c in columns) + " |",
        "| patients | " + " | ".join(f"{summary[c]['patients']:,}" for c in columns) + " |",
        "| share | "
        + " | ".join(f"{100 * summary[c]['image_share']:.1f} %" for c in columns)
        + " |",
    ]
    for label in LABELS:
        cells = []
        for column in columns:
            counts = summary[column]["labels"][label]
            cells.append(f"{counts['positives']:,} ({100 * counts['prevalence']:.2f} %)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return (
        "# Split summary\n\nPositives per label (prevalence among the split's images whose label is known).\n\n"
        + ("\n".join(lines) + "\n")
    )


def write_summary(summary: dict, out: Path) -> tuple[Path, Path]:
    """Write `summarise`'s dict as `split_summary.json` and a Markdown table, atomically.

    Args:
        summary: `summarise(split)`.
        out: the run or cache folder (created if needed).

    Returns:
        The JSON and Markdown paths.
    """
    out = Path(out)
    json_path = write_atomic(out / SUMMARY_JSON, (json.dumps(summary, indent=2) + "\n").encode())
    return json_path, write_atomic(out / SUMMARY_MD, _markdown(summary).encode("utf-8"))
