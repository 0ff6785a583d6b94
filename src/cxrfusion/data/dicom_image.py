"""DICOM radiographs to 8-bit grayscale: the header checks that come before any pixel is decoded
(modality, size, decoded bytes, frames, colour), and the grey-level rules (`imageio.read_image`
lists them)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi

from cxrfusion.data.pixels import Source, check_size, one_line, range_to_uint8
from cxrfusion.errors import CxrError

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
# What pydicom raises for damaged or unsupported files (it has no single base class). Not
# AttributeError/TypeError: the elements whose absence pydicom reports that way are checked first
# (`_check_dicom_header`), so those two stay what they are elsewhere, bugs with a traceback.
DICOM_ERRORS = (
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


def check_dicom(path: Path) -> None:
    """Read only the header of a DICOM file and check it, decoding no pixel."""
    try:
        _check_dicom_header(path, pydicom.dcmread(path, defer_size="64 KB"))
    except DICOM_ERRORS as exc:
        raise CxrError(f"{path}: not a readable DICOM file ({one_line(exc)})") from exc


def read_dicom(source: Source, path: Path | str) -> tuple[np.ndarray, str]:
    """Pixels as uint8 (H, W), and the view warning of the header ("" if none)."""
    try:
        # Large elements (the pixel data) stay on disk until the header has been checked.
        dataset = pydicom.dcmread(source, defer_size="64 KB")
        photometric = _check_dicom_header(path, dataset)
    except DICOM_ERRORS as exc:
        raise CxrError(f"{path}: not a readable DICOM file ({one_line(exc)})") from exc
    try:
        stored = dataset.pixel_array
        if stored.ndim != 2:
            raise CxrError(
                f"{path}: DICOM pixel data has shape {stored.shape}, expected one 2-D frame"
            )
        gray = _dicom_to_uint8(path, dataset, stored)
    except DICOM_ERRORS as exc:
        raise CxrError(
            f"{path}: truncated, corrupt or unsupported DICOM pixel data ({one_line(exc)})"
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
    return range_to_uint8(values, low, high)


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
    table = range_to_uint8(table, float(table.min()), float(table.max()))
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
        return range_to_uint8(values, -1.0, 1.0)
    if function == "LINEAR":  # its ends are c - 0.5 -+ (w - 1) / 2
        center, width = center - 0.5, width - 1.0
    return range_to_uint8(values, center - width / 2, center + width / 2)


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
    check_size(path, columns, rows)
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
