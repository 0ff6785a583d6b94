"""Decode user-facing image files (PNG, JPEG, DICOM) into 8-bit grayscale arrays.

Every input the toolkit accepts passes through `read_image` (files) or `read_radiograph` (files or
uploaded bytes), so this is where untrusted files are met: sizes (and a DICOM's modality) are
checked from the header before any pixel is decoded (decompression bombs), and every problem with
the file becomes one `CxrError` line naming the file. Conversions to 8-bit grayscale are deliberate
and documented per input kind in `read_image`. Compressed DICOM (JPEG Lossless, JPEG-LS, JPEG 2000,
RLE) decodes through pydicom's pixel-data plugins (pylibjpeg with its libjpeg and openjpeg
backends; RLE natively).
"""

from __future__ import annotations

import io
import logging
import stat
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from cxrfusion.data.dicom_image import check_dicom, read_dicom
from cxrfusion.data.pixels import MAX_PIXELS, Source, check_size, minmax_to_uint8, one_line
from cxrfusion.errors import CxrError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom")

_PIL_FORMATS = ("PNG", "JPEG")
_HIGH_BIT_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I"})
_DICOM_PREAMBLE_LENGTH = 128
# What Pillow raises for damaged files once the header was identified.
_PIL_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)


@dataclass(frozen=True)
class Radiograph:
    """A decoded radiograph and what its header says about trusting a chest model on it.

    Attributes:
        pixels: writable C-contiguous uint8 array (H, W), as `read_image` returns.
        warning: "" or why a frontal-chest model may not apply (e.g. a DICOM whose ViewPosition
            is LL, or whose BodyPartExamined is not CHEST).
    """

    pixels: np.ndarray
    warning: str = ""


def read_image(path: Path | str) -> np.ndarray:
    """Decode a radiograph file into a 2-D uint8 grayscale array (H, W).

    Conversions, all deliberate:

    - 8-bit grayscale PNG/JPEG: returned as stored.
    - 16-bit grayscale PNG (Pillow modes I;16 / I): linearly stretched from the image's own
      min..max to 0..255. Dividing by 65535 would turn the common 12-bit-in-16-bit exports
      (values up to 4095) nearly black. A constant image maps to 0.
    - RGB, RGBA, LA, P (palette), 1 (bilevel), CMYK: converted with Pillow's ITU-R 601-2 luma;
      alpha is dropped, not composited (exported radiographs carry an opaque or meaningless alpha
      channel, and compositing would darken pixels where it is not 255). Logged at debug level.
    - DICOM (suffix .dcm/.dicom or the "DICM" marker after the 128-byte preamble): the modality
      LUT (or rescale slope/intercept), then the first of these that applies:
      a VOI LUT maps its own output range to 0..255; a window (center/width, VOI LUT function
      LINEAR, LINEAR_EXACT or SIGMOID, DICOM PS3.3 C.11.2) maps onto 0..255; BitsStored 8 with
      values within 0..255 is taken as stored, exactly like an 8-bit PNG; any other depth gets
      the same min..max stretch as a 16-bit PNG. MONOCHROME1 is then inverted (255 - value) so
      that bone is bright. All steps run in float32 on one working copy. Multi-frame and colour
      DICOMs, and modalities other than `RADIOGRAPH_MODALITIES` (or none), are refused.

    Args:
        path: the image file. Its header is checked before decoding: images over `MAX_PIXELS`
            pixels (DICOM: over `MAX_DICOM_BYTES` decoded bytes) or with a side under `MIN_SIDE`
            pixels are refused.

    Returns:
        A writable C-contiguous uint8 array of shape (height, width).

    Raises:
        CxrError: the file is missing, empty, not a PNG/JPEG/DICOM image, truncated, corrupt,
            too large or too small, or a DICOM of another modality. The message is one line
            starting with the path.
    """
    return read_radiograph(path).pixels


def read_radiograph(source: Path | str | bytes, name: str = "upload") -> Radiograph:
    """Decode a file, or the bytes of one (an upload), into a `Radiograph`.

    Same formats, checks and conversions as `read_image`; DICOM headers are also read for a
    warning when they describe something other than a frontal chest view.

    Args:
        source: a path, or the whole file's bytes.
        name: what error messages call bytes (the upload's name); paths name themselves. It is
            only used in messages, never as a file name.

    Raises:
        CxrError: as `read_image`, the message starting with the path or `name`.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        if not data:
            raise CxrError(f"{name}: empty file (0 bytes)")
        dicom = Path(name).suffix.lower() in DICOM_SUFFIXES or _has_dicom_marker(data)
        return _decode(io.BytesIO(data), name, dicom)
    path = Path(source)
    _check_regular_nonempty_file(path)
    return _decode(path, path, _is_dicom(path))


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a grayscale image to (size, size) with Pillow's bilinear filter.

    Non-square images are squashed to a square, not cropped or padded: NIH radiographs are
    square already, and squashing keeps the whole field of view for the rare other ones.
    Pillow's bilinear filter widens its support when downscaling (antialiased), and its 8-bit
    path is integer arithmetic, so the result is bit-identical on every call: the image cache
    relies on "cached image == fresh decode + resize".

    Args:
        image: 2-D uint8 array (H, W), as returned by `read_image`.
        size: output side in pixels (the model's input resolution, e.g. 224 or 256).

    Returns:
        A writable uint8 array of shape (size, size).
    """
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(
            f"image must be a 2-D uint8 array, got shape {image.shape} and dtype {image.dtype}"
        )
    return np.array(_resize(Image.fromarray(image), size))


def read_resized(path: Path | str, size: int) -> np.ndarray:
    """Decode an image file and resize it to (size, size): `resize_square(read_image(path), size)`.

    JPEG draft mode (decoding at 1/2, 1/4 or 1/8 scale in the DCT domain) is deliberately not
    used: it would be faster, but its pixels differ from a full decode followed by the resize,
    and a cached image must equal a fresh decode. The image stays a Pillow image between decode
    and resize (no NumPy round trip): same pixels, ~2 ms less per 1024x1024 image.

    Args:
        path: the image file (see `read_image` for formats, checks and conversions).
        size: output side in pixels.

    Returns:
        A writable uint8 array of shape (size, size).

    Raises:
        CxrError: as `read_image`.
    """
    path = Path(path)
    _check_regular_nonempty_file(path)
    if _is_dicom(path):
        return np.array(_resize(Image.fromarray(read_dicom(path, path)[0]), size))
    return np.array(_resize(_read_pil(path, path), size))


def check_image(path: Path | str) -> None:
    """Read only the header: existence, signature and size, without decoding any pixel.

    Cheap enough to run on every image of a dataset before long work starts (about 0.1 ms per
    file); truncation deeper in the file only shows when `read_image` decodes it.

    Raises:
        CxrError: as `read_image`, for every problem visible in the header.
    """
    path = Path(path)
    _check_regular_nonempty_file(path)
    if _is_dicom(path):
        check_dicom(path)
        return
    with _pil_errors(path), Image.open(path, formats=_PIL_FORMATS) as img:
        check_size(path, *img.size)


def _decode(source: Source, label: Path | str, dicom: bool) -> Radiograph:
    """Decode a checked file or an in-memory one; `label` names it in messages."""
    if dicom:
        pixels, warning = read_dicom(source, label)
        return Radiograph(pixels, warning)
    return Radiograph(np.array(_read_pil(source, label)))


def _resize(image: Image.Image, size: int) -> Image.Image:
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    return image.resize((size, size), Image.Resampling.BILINEAR)


def _check_regular_nonempty_file(path: Path) -> None:
    try:
        info = path.stat()
    except FileNotFoundError as exc:
        raise CxrError(f"{path}: file not found") from exc
    except OSError as exc:
        raise CxrError(f"{path}: cannot read file ({exc.strerror})") from exc
    if not stat.S_ISREG(info.st_mode):
        raise CxrError(f"{path}: not a regular file (a directory or device?)")
    if info.st_size == 0:
        raise CxrError(f"{path}: empty file (0 bytes)")


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as handle:
            head = handle.read(_DICOM_PREAMBLE_LENGTH + 4)
    except OSError as exc:
        raise CxrError(f"{path}: cannot read file ({exc.strerror})") from exc
    return _has_dicom_marker(head)


def _has_dicom_marker(head: bytes) -> bool:
    return head[_DICOM_PREAMBLE_LENGTH : _DICOM_PREAMBLE_LENGTH + 4] == b"DICM"


def _read_pil(source: Source, path: Path | str) -> Image.Image:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # A global Pillow switch: when set, truncated files decode silently with grey padding.
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set to True by some code in this process; "
            "cxrfusion needs it False to detect truncated images"
        )
    # Image.open reads only the header, so the size check runs before any allocation.
    with _pil_errors(path), Image.open(source, formats=_PIL_FORMATS) as img:
        check_size(path, *img.size)
        img.load()
        return _pil_to_gray(path, img)


@contextmanager
def _pil_errors(path: Path | str) -> Iterator[None]:
    """Turn Pillow's exceptions for bad files into one-line CxrErrors."""
    try:
        yield
    except Image.DecompressionBombError as exc:
        # Pillow refuses headers above twice its own limit before our check can run.
        raise CxrError(
            f"{path}: image too large: more than {MAX_PIXELS:,} pixels ({one_line(exc)})"
        ) from exc
    except UnidentifiedImageError as exc:
        raise CxrError(f"{path}: not an image (no PNG, JPEG or DICOM signature)") from exc
    except _PIL_DECODE_ERRORS as exc:
        raise CxrError(f"{path}: truncated or corrupt image ({one_line(exc)})") from exc


def _pil_to_gray(path: Path | str, img: Image.Image) -> Image.Image:
    if img.mode == "L":
        return img
    if img.mode in _HIGH_BIT_DEPTH_MODES:
        logger.debug("%s: stretching %s pixel range to 8 bits", path, img.mode)
        return Image.fromarray(minmax_to_uint8(np.asarray(img)))
    logger.debug("%s: converting %s image to grayscale (alpha dropped)", path, img.mode)
    return img.convert("L")
