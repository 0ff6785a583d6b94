"""Each dataset's findings mapped onto our 14 labels: data (label_maps/<dataset>.csv), not code.

A map's rows are `term,labels`: the dataset's exact finding name (matched whole, after trimming;
never as a substring, so PadChest's "pseudonodule" is not a "nodule") and the labels it means,
`|`-separated, or `-` for a finding that is none of ours. A term missing from the map is an
error, as an unknown NIH label is. A label that no term maps to is one the dataset does not
report: NaN for all its images. docs/datasets.md shows the maps.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cache
from importlib import resources

import numpy as np
import pandas as pd

from cxrfusion.labels import LABEL_INDEX, NUM_LABELS

NOT_OURS = "-"


@cache
def load_map(dataset: str) -> dict[str, tuple[str, ...]]:
    """`label_maps/<dataset>.csv` as {term: our labels (empty for "-")}, checked."""
    with resources.files(__package__).joinpath("label_maps", f"{dataset}.csv").open() as handle:
        rows = pd.read_csv(handle, dtype=str, keep_default_na=False)
    mapping = {}
    for term, labels in zip(rows["term"], rows["labels"], strict=True):
        ours = () if labels == NOT_OURS else tuple(labels.split("|"))
        unknown = [label for label in ours if label not in LABEL_INDEX]
        if unknown or term in mapping:
            raise ValueError(f"label_maps/{dataset}.csv: bad row {term!r}: {labels!r}")
        mapping[term] = ours
    return mapping


def covered(dataset: str) -> np.ndarray:
    """(14,) bool: the labels some term of the dataset maps to (the others are unknown)."""
    mask = np.zeros(NUM_LABELS, dtype=bool)
    for labels in load_map(dataset).values():
        mask[[LABEL_INDEX[label] for label in labels]] = True
    return mask


def encode_terms(dataset: str, rows: Sequence[Iterable[str]]) -> np.ndarray:
    """(n, 14) float32: 1 where a row's terms map to the label, 0 where the dataset reports the
    label and no term does, NaN where it never reports it.

    Raises:
        KeyError: naming the first term the map lacks (readers turn it into a CxrError with the
            file and line).
    """
    mapping = load_map(dataset)
    out = np.zeros((len(rows), NUM_LABELS), dtype=np.float32)
    for i, terms in enumerate(rows):
        for term in terms:
            if term not in mapping:
                raise KeyError(term)
            out[i, [LABEL_INDEX[label] for label in mapping[term]]] = 1.0
    out[:, ~covered(dataset)] = np.nan
    return out
