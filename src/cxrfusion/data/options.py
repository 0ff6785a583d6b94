"""What a user can set for the data pipeline: plain dataclasses that import nothing heavy.

`cxrfusion --help` reads its defaults from here, so it answers without loading torch or sklearn.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PrepareOptions:
    """How to split and cache a dataset (the defaults are the report's).

    Args:
        split: "iterative" (patient subset + iterative multi-label stratification) or "official"
            (NIH's train_val_list.txt / test_list.txt, validation carved out by patient).
        patient_fraction: share of patients kept (the report uses a random 50 %).
        val: validation share of images.
        test: test share of images.
        seed: seed of the patient subset and of the stratification.
        size: side of the cached square images (keep it above the model input, 256 for 224).
        workers: processes decoding images.
        labels_only: write the split only; no image is opened or required.
        skip_missing: exclude missing or unreadable images (listed in excluded.csv) instead of stopping.
    """

    split: str = "iterative"
    patient_fraction: float = 0.5
    val: float = 0.1
    test: float = 0.2
    seed: int = 0
    size: int = 256
    workers: int = 1
    labels_only: bool = False
    skip_missing: bool = False


@dataclass(frozen=True)
class Augmentation:
    """The report's light augmentation, applied to training images only.

    Args:
        flip: probability of a horizontal flip.
        rotate_deg: rotation drawn uniformly from [-rotate_deg, +rotate_deg] degrees.
        zoom: scale drawn uniformly from [1 - zoom, 1 + zoom] (above 1 zooms in).
        brightness: intensity factor drawn uniformly from [1 - brightness, 1 + brightness].
    """

    flip: float = 0.5
    rotate_deg: float = 10.0
    zoom: float = 0.1
    brightness: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.flip <= 1.0:
            raise ValueError(f"flip must be a probability in [0, 1], got {self.flip}")
        for name in ("rotate_deg", "zoom", "brightness"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.zoom >= 1 or self.brightness >= 1:
            raise ValueError("zoom and brightness must be below 1 (they are relative changes)")
