"""What a user can set for the data pipeline: plain dataclasses that import nothing heavy.

`cxrfusion --help` reads its defaults from here, so it answers without loading torch or sklearn.
"""

from __future__ import annotations

from dataclasses import dataclass

from cxrfusion.checks import InvalidOption, check_bool, check_choice, check_number, check_text

SPLIT_METHODS = ("auto", "iterative", "official")
UNCERTAIN = ("mask", "zeros", "ones")
# The one view vocabulary of every source (sources/schema.py maps each dataset's onto it).
VIEWS = ("PA", "AP", "AP_SUPINE", "LATERAL", "UNKNOWN")
VIEW_SETS = {"frontal": ("PA", "AP", "AP_SUPINE"), "all": VIEWS}
MIN_SIZE = 28  # smallest image side in pixels: ChestMNIST's native 28 px; the simple CNN still fits


@dataclass(frozen=True)
class PrepareOptions:
    """How to split and cache a dataset (the defaults are the report's).

    Args:
        split: "iterative" (patient subset + iterative multi-label stratification), "official"
            (the dataset's published split: NIH's train_val_list.txt / test_list.txt, CheXpert's
            valid.csv as test, MIMIC's split file, VinDr's test set; validation carved out by
            patient where none is published) or "auto" (official for MIMIC and for VinDr with
            test labels, iterative elsewhere: NIH's default is the report's split).
        patient_fraction: share of patients kept (the report uses a random 50 %).
        val: validation share of images.
        test: test share of images.
        seed: seed of the patient subset and of the stratification.
        size: side of the cached square images (keep it above the model input, 256 for 224).
        workers: processes decoding images.
        labels_only: write the split only; no image is opened or required.
        skip_missing: exclude missing or unreadable images (listed in excluded.csv) instead of stopping.
        uncertain: CheXpert/MIMIC's -1 (uncertain) as "mask" (NaN: not learned, not scored),
            "zeros" or "ones".
        readers: how VinDr's three readers combine per finding: "majority" (more than half of
            the image's readers), "union" (any reader) or "any:N" (at least N readers).
        views: views kept: "frontal" (PA, AP, AP_SUPINE), "all", or a comma list of VIEWS.
    """

    split: str = "auto"
    patient_fraction: float = 0.5
    val: float = 0.1
    test: float = 0.2
    seed: int = 0
    size: int = 256
    workers: int = 1
    labels_only: bool = False
    skip_missing: bool = False
    uncertain: str = "mask"
    readers: str = "majority"
    views: str = "frontal"

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
        check_choice("uncertain", self.uncertain, UNCERTAIN)
        check_text("readers", self.readers)
        check_text("views", self.views)
        self.min_readers(1)
        self.view_set()

    def min_readers(self, readers: int) -> int:
        """How many of an image's `readers` must report a finding for a positive label."""
        if self.readers == "majority":
            return readers // 2 + 1
        if self.readers == "union":
            return 1
        count = self.readers.removeprefix("any:")
        if self.readers.startswith("any:") and count.isdigit() and int(count) >= 1:
            return int(count)
        raise InvalidOption(
            f"readers (--readers) must be majority, union or any:N (N >= 1), got {self.readers!r}"
        )

    def view_set(self) -> tuple[str, ...]:
        """The views kept, from `views`."""
        if self.views in VIEW_SETS:
            return VIEW_SETS[self.views]
        chosen = tuple(v.strip().upper() for v in self.views.split(","))
        unknown = [v for v in chosen if v not in VIEWS]
        if unknown or not self.views.strip():
            raise InvalidOption(
                f"views (--views) must be frontal, all or a comma list of {', '.join(VIEWS)}, "
                f"got {self.views!r}"
            )
        return chosen


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
