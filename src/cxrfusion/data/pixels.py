"""What every image reader shares: the size limits checked from a header, and the linear map
of grey levels onto 0..255."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from cxrfusion.errors import CxrError

# A 1024x1024 NIH radiograph is 1 MP and large detector DICOMs are ~10-20 MP; 60 MP leaves room
# for any real radiograph while refusing headers that would allocate gigabytes.
MAX_PIXELS = 60_000_000
# Below this side length a file is an icon or a placeholder, not a radiograph.
MIN_SIDE = 16
_MAX_DETAIL_CHARS = 200
Source = Path | io.BytesIO  # a checked file, or an upload's bytes


def check_size(path: Path | str, width: int, height: int) -> None:
    """Refuse an image of more than `MAX_PIXELS` pixels or a side under `MIN_SIDE`."""
    if width * height > MAX_PIXELS:
        raise CxrError(
            f"{path}: image too large: {width}x{height} pixels exceeds the limit of "
            f"{MAX_PIXELS:,} pixels"
        )
    if min(width, height) < MIN_SIDE:
        raise CxrError(
            f"{path}: image too small: {width}x{height} (each side must be at least {MIN_SIDE})"
        )


def minmax_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Stretch pixels linearly from their own min..max to 0..255; a constant image gives 0."""
    return range_to_uint8(pixels.astype(np.float32), float(pixels.min()), float(pixels.max()))


def range_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map float32 `values` linearly from low..high onto 0..255, clipped and rounded.

    `values` is overwritten: float32 in place is exact for 16-bit values and makes no copy of
    what may be a 60 MP image. An empty range (a constant image) gives 0.
    """
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    values -= low
    values *= 255.0 / (high - low)
    np.clip(values, 0.0, 255.0, out=values)
    return np.rint(values, out=values).astype(np.uint8)


def one_line(exc: BaseException) -> str:
    """The exception's text on one line, shortened: it goes inside a one-line CxrError."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:_MAX_DETAIL_CHARS]
