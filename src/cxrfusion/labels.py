"""The 14 ChestX-ray14 pathologies, in the one fixed order used everywhere."""

from __future__ import annotations

import numpy as np

LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Effusion",
    "Emphysema",
    "Fibrosis",
    "Hernia",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pleural_Thickening",
    "Pneumonia",
    "Pneumothorax",
)
NUM_LABELS = len(LABELS)
NO_FINDING = "No Finding"
LABEL_INDEX = {name: i for i, name in enumerate(LABELS)}


def multi_hot(findings: str) -> np.ndarray:
    """Encode a `|`-separated `Finding Labels` string ("No Finding" = all zero).

    Raises:
        ValueError: for a label that is not one of the 14 (never a silent zero).
    """
    vector = np.zeros(NUM_LABELS, dtype=np.uint8)
    for name in (part.strip() for part in findings.split("|")):
        if name == NO_FINDING:
            continue
        if name not in LABEL_INDEX:
            raise ValueError(f"unknown label {name!r}")
        vector[LABEL_INDEX[name]] = 1
    return vector
