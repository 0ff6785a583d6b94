"""What a user can set for the data pipeline: plain dataclasses that import nothing heavy.

`cxrfusion --help` reads its defaults from here, so it answers without loading torch or sklearn.
"""

from __future__ import annotations

from dataclasses import dataclass

from cxrfusion.checks import InvalidOption, check_bool, check_choice, check_number

SPLIT_METHODS = ("iterative", "official")
MIN_SIZE = 28  # smallest image side in pixels: ChestMNIST's native 28 px; the simple CNN still fits


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

    def __post_init__(self) -> None:
        check_choice("split", self.split, SPLIT_METHODS)
        check_number("patient_fraction", self.patient_fraction, above=0, high=1)
        check_number("val", self.val, above=0, below=1)
        check_number("test", self.test, above=0, below=1)
        if self.val + self.test >= 1:
            raise InvalidOption(
                f"val + test (--val, --test) must be below 1 to leave training images, "
                f"got {self.val} + {self.test}"
            )
        check_number("seed", self.seed, integer=True, low=0, high=2**32 - 1)
        check_number("size", self.size, integer=True, low=MIN_SIZE)
        check_number("workers", self.workers, integer=True, low=1)
        check_bool("labels_only", self.labels_only)
        check_bool("skip_missing", self.skip_missing)


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
        check_number("flip", self.flip, low=0, high=1)
        check_number("rotate_deg", self.rotate_deg, low=0, high=180)
        # Relative changes: at 1 an image could shrink or darken to nothing.
        check_number("zoom", self.zoom, low=0, below=1)
        check_number("brightness", self.brightness, low=0, below=1)
