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
import pydicom
from PIL import Image, ImageFile, UnidentifiedImageError
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi

from cxrfusion.errors import CxrError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom")
# A 1024x1024 NIH radiograph is 1 MP and large detector DICOMs are ~10-20 MP; 60 MP leaves room
# for any real radiograph while refusing headers that would allocate gigabytes.
MAX_PIXELS = 60_000_000
# Below this side length a file is an icon or a placeholder, not a radiograph.
MIN_SIDE = 16
# Decoded DICOM pixel data (rows x columns x frames x samples x bytes per sample) above this is
# refused from the header: 64 MiB holds a 16-bit 32 MP radiograph (the largest detectors, 43x43 cm
# at 100 um, give 18 MP) and an 8-bit image of MAX_PIXELS. Decoding peaks near 9 bytes per 16-bit
# pixel (file, decoded array, one float32 copy, result): about 300 MB at the limit.
MAX_DICOM_BYTES = 64 * 2**20
# Modalities of a radiograph: CR and DX (computed and digital radiography), DR (not a DICOM term,
# but some detectors write it), RG (digitised film) and OT (secondary captures and exports, like a
# file with no Modality). Anything else (CT, MR, US, NM, PT, MG, XA, SEG, SR...) is refused: a
# chest radiograph model's numbers on it mean nothing.
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "DR", "RG", "OT"})

_PIL_FORMATS = ("PNG", "JPEG")
_HIGH_BIT_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I"})
_DICOM_PREAMBLE_LENGTH = 128
# What Pillow raises for damaged files once the header was identified.
_PIL_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)
# What pydicom raises for damaged or unsupported files (it has no single base class). Not
# AttributeError/TypeError: the elements whose absence pydicom reports that way are checked first
# (`_check_dicom_header`), so those two stay what they are elsewhere, bugs with a traceback.
_DICOM_ERRORS = (
    InvalidDicomError,
    OSError,
    EOFError,
    ValueError,
    KeyError,
    NotImplementedError,
    RuntimeError,
    struct.error,
)
# Elements pixel decoding needs; pydicom reports their absence as an AttributeError.
_DICOM_REQUIRED = ("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation")
# Projections of a frontal chest radiograph; anything else (LL, RL, LATERAL, ...) is another view.
FRONTAL_VIEWS = frozenset({"PA", "AP"})
_MAX_DETAIL_CHARS = 200
Source = Path | io.BytesIO  # a checked file, or an upload's bytes


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
        return np.array(_resize(Image.fromarray(_read_dicom(path, path)[0]), size))
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
        try:
            _check_dicom_header(path, pydicom.dcmread(path, defer_size="64 KB"))
            return
        except _DICOM_ERRORS as exc:
            raise CxrError(f"{path}: not a readable DICOM file ({_one_line(exc)})") from exc
    with _pil_errors(path), Image.open(path, formats=_PIL_FORMATS) as img:
        _check_size(path, *img.size)


def _decode(source: Source, label: Path | str, dicom: bool) -> Radiograph:
    """Decode a checked file or an in-memory one; `label` names it in messages."""
    if dicom:
        pixels, warning = _read_dicom(source, label)
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


def _check_size(path: Path | str, width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise CxrError(
            f"{path}: image too large: {width}x{height} pixels exceeds the limit of "
            f"{MAX_PIXELS:,} pixels"
        )
    if min(width, height) < MIN_SIDE:
        raise CxrError(
            f"{path}: image too small: {width}x{height} (each side must be at least {MIN_SIDE})"
        )


def _read_pil(source: Source, path: Path | str) -> Image.Image:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # A global Pillow switch: when set, truncated files decode silently with grey padding.
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set to True by some code in this process; "
            "cxrfusion needs it False to detect truncated images"
        )
    # Image.open reads only the header, so the size check runs before any allocation.
    with _pil_errors(path), Image.open(source, formats=_PIL_FORMATS) as img:
        _check_size(path, *img.size)
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
            f"{path}: image too large: more than {MAX_PIXELS:,} pixels ({_one_line(exc)})"
        ) from exc
    except UnidentifiedImageError as exc:
        raise CxrError(f"{path}: not an image (no PNG, JPEG or DICOM signature)") from exc
    except _PIL_DECODE_ERRORS as exc:
        raise CxrError(f"{path}: truncated or corrupt image ({_one_line(exc)})") from exc


def _pil_to_gray(path: Path | str, img: Image.Image) -> Image.Image:
    if img.mode == "L":
        return img
    if img.mode in _HIGH_BIT_DEPTH_MODES:
        logger.debug("%s: stretching %s pixel range to 8 bits", path, img.mode)
        return Image.fromarray(minmax_to_uint8(np.asarray(img)))
    logger.debug("%s: converting %s image to grayscale (alpha dropped)", path, img.mode)
    return img.convert("L")


def _read_dicom(source: Source, path: Path | str) -> tuple[np.ndarray, str]:
    """Pixels as uint8 (H, W), and the view warning of the header ("" if none)."""
    try:
        # Large elements (the pixel data) stay on disk until the header has been checked.
        dataset = pydicom.dcmread(source, defer_size="64 KB")
        photometric = _check_dicom_header(path, dataset)
    except _DICOM_ERRORS as exc:
        raise CxrError(f"{path}: not a readable DICOM file ({_one_line(exc)})") from exc
    try:
        stored = dataset.pixel_array
        if stored.ndim != 2:
            raise CxrError(
                f"{path}: DICOM pixel data has shape {stored.shape}, expected one 2-D frame"
            )
        gray = _dicom_to_uint8(path, dataset, stored)
    except _DICOM_ERRORS as exc:
        raise CxrError(
            f"{path}: truncated, corrupt or unsupported DICOM pixel data ({_one_line(exc)})"
        ) from exc
    return (255 - gray if photometric == "MONOCHROME1" else gray), _view_warning(dataset)


def _dicom_to_uint8(path: Path | str, dataset: pydicom.Dataset, stored: np.ndarray) -> np.ndarray:
    """Stored pixels to 8-bit display values, before any MONOCHROME1 inversion (`read_image`)."""
    values = _modality_values(path, dataset, stored)
    sequence = dataset.get("VOILUTSequence")
    if sequence and "LUTDescriptor" in sequence[0] and "LUTData" in sequence[0]:
        return _voi_lut_to_uint8(dataset, values)
    center = _float_element(path, dataset, "WindowCenter", None)
    width = _float_element(path, dataset, "WindowWidth", None)
    if center is not None and width is not None:
        function = str(dataset.get("VOILUTFunction") or "LINEAR").strip().upper()
        return _window_to_uint8(path, values, center, width, function)
    low, high = float(values.min()), float(values.max())
    if _int_element(path, dataset, "BitsStored", 0) == 8 and low >= 0 and high <= 255:
        low, high = 0.0, 255.0  # as stored: an 8-bit DICOM decodes like an 8-bit PNG
    return _range_to_uint8(values, low, high)


def _modality_values(path: Path | str, dataset: pydicom.Dataset, stored: np.ndarray) -> np.ndarray:
    """The modality LUT or rescale slope/intercept applied: a new float32 array."""
    if dataset.get("ModalityLUTSequence"):
        return apply_modality_lut(stored, dataset).astype(np.float32)
    values = stored.astype(np.float32)
    slope = _float_element(path, dataset, "RescaleSlope", 1.0)
    intercept = _float_element(path, dataset, "RescaleIntercept", 0.0)
    if slope != 1.0:
        values *= slope
    if intercept != 0.0:
        values += intercept
    return values


def _voi_lut_to_uint8(dataset: pydicom.Dataset, values: np.ndarray) -> np.ndarray:
    """The first VOI LUT applied, its own output range mapped to 0..255; `values` is overwritten."""
    entries, first = dataset.VOILUTSequence[0].LUTDescriptor[:2]
    entries = entries or 2**16
    # The table itself, as pydicom reads it (VR, byte order, bits): look up each of its inputs.
    table = apply_voi(np.arange(first, first + entries), dataset).astype(np.float32)
    table = _range_to_uint8(table, float(table.min()), float(table.max()))
    np.rint(values, out=values)
    values -= first
    np.clip(values, 0, entries - 1, out=values)
    return table[values.astype(np.uint16)]


def _window_to_uint8(
    path: Path | str, values: np.ndarray, center: float, width: float, function: str
) -> np.ndarray:
    """A window (DICOM PS3.3 C.11.2.1.2-3) mapped onto 0..255; `values` is overwritten."""
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        raise CxrError(f"{path}: unsupported DICOM VOILUTFunction {function!r}")
    if width <= (1.0 if function == "LINEAR" else 0.0):
        raise CxrError(f"{path}: DICOM WindowWidth {width:g} leaves no grey levels ({function})")
    if function == "SIGMOID":  # 255 / (1 + exp(-4 (x - c) / w)), written so as not to overflow
        values -= center
        values *= 2.0 / width
        np.tanh(values, out=values)
        return _range_to_uint8(values, -1.0, 1.0)
    if function == "LINEAR":  # its ends are c - 0.5 -+ (w - 1) / 2
        center, width = center - 0.5, width - 1.0
    return _range_to_uint8(values, center - width / 2, center + width / 2)


def _view_warning(dataset: pydicom.Dataset) -> str:
    """Why the header says this is not a frontal chest radiograph ("" when it does not)."""
    reasons = []
    view = str(dataset.get("ViewPosition", "") or "").strip().upper()
    if view and view not in FRONTAL_VIEWS:
        reasons.append(f"DICOM ViewPosition {view}: not a frontal chest view")
    part = str(dataset.get("BodyPartExamined", "") or "").strip().upper()
    if part and part != "CHEST":
        reasons.append(f"DICOM BodyPartExamined {part}: not a chest radiograph")
    return "; ".join(reasons)


def _int_element(path: Path | str, dataset: pydicom.Dataset, keyword: str, default: int) -> int:
    """An integer header element, or a CxrError naming it when its value is not one number."""
    value = dataset.get(keyword)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise CxrError(f"{path}: DICOM {keyword} is not an integer ({value!r})") from exc


def _float_element(
    path: Path | str, dataset: pydicom.Dataset, keyword: str, default: float | None
) -> float | None:
    """A number from the header (the first of several), or a CxrError naming a bad value."""
    value = dataset.get(keyword)
    if isinstance(value, MultiValue):
        value = value[0] if value else None
    if value is None or value == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise CxrError(f"{path}: DICOM {keyword} is not a number ({value!r})") from exc


def _check_dicom_header(path: Path | str, dataset: pydicom.Dataset) -> str:
    """Validate what decoding needs; return the photometric interpretation."""
    modality = str(dataset.get("Modality", "") or "").strip().upper()
    if modality and modality not in RADIOGRAPH_MODALITIES:
        raise CxrError(
            f"{path}: DICOM Modality {modality} is not a radiograph "
            f"(accepted: {', '.join(sorted(RADIOGRAPH_MODALITIES))})"
        )
    if "PixelData" not in dataset:
        raise CxrError(f"{path}: DICOM file holds no image (no PixelData element; truncated?)")
    missing = [keyword for keyword in _DICOM_REQUIRED if dataset.get(keyword) is None]
    if missing:
        raise CxrError(f"{path}: DICOM file lacks {'/'.join(missing)}")
    rows, columns = (_int_element(path, dataset, k, 0) for k in ("Rows", "Columns"))
    _check_size(path, columns, rows)
    samples = _int_element(path, dataset, "SamplesPerPixel", 1)
    frames = _int_element(path, dataset, "NumberOfFrames", 1)
    bits = _int_element(path, dataset, "BitsAllocated", 0)
    decoded = rows * columns * frames * samples * ((bits + 7) // 8)
    if decoded > MAX_DICOM_BYTES:
        raise CxrError(
            f"{path}: image too large: {columns}x{rows} pixels x {frames} frame(s) x {samples} "
            f"sample(s) at {bits} bits decode to {decoded:,} bytes, over the limit of "
            f"{MAX_DICOM_BYTES:,}"
        )
    if samples != 1:
        raise CxrError(f"{path}: colour DICOM ({samples} samples per pixel) is not supported")
    if frames > 1:
        raise CxrError(f"{path}: multi-frame DICOM ({frames} frames) is not supported")
    photometric = str(dataset.get("PhotometricInterpretation", ""))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise CxrError(
            f"{path}: unsupported DICOM PhotometricInterpretation {photometric!r} "
            "(only MONOCHROME1/MONOCHROME2 radiographs)"
        )
    return photometric


def minmax_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Stretch pixels linearly from their own min..max to 0..255; a constant image gives 0."""
    return _range_to_uint8(pixels.astype(np.float32), float(pixels.min()), float(pixels.max()))


def _range_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
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


def _one_line(exc: BaseException) -> str:
    """The exception's text on one line, shortened: it goes inside a one-line CxrError."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:_MAX_DETAIL_CHARS]
