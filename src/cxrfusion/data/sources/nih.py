"""NIH ChestX-ray14 as a source: `data/nih.py`'s table in the shared schema."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cxrfusion.data.nih import IMAGE_COLUMN, PATIENT_COLUMN, find_images, find_table, read_table
from cxrfusion.data.options import PrepareOptions
from cxrfusion.data.sources.schema import AGE_COLUMN, SEX_COLUMN, VIEW_COLUMN, new_table
from cxrfusion.labels import LABELS

NAME = "nih"
# NIH publishes a split (train_val_list.txt, test_list.txt), but the report's is the default.
OFFICIAL_BY_DEFAULT = False


def read_source(root: Path, options: PrepareOptions) -> pd.DataFrame:
    """The NIH table (ids stay integers); images located unless `labels_only`."""
    raw = read_table(find_table(root))
    names = raw[IMAGE_COLUMN]
    if options.labels_only:
        paths = pd.Series([""] * len(raw))
    else:
        found, _ = find_images(root, names)
        paths = names.map(lambda name: str(found.get(name, "")))
    views = raw[VIEW_COLUMN].str.strip().str.upper() if VIEW_COLUMN in raw else None
    return new_table(
        NAME,
        names,
        raw[PATIENT_COLUMN],
        raw[list(LABELS)].to_numpy(),
        paths,
        views,
        raw.get(AGE_COLUMN),
        raw.get(SEX_COLUMN),
    )
