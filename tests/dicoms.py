"""DICOM files for the tests, written with pydicom as a modality or a PACS export writes them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


def write_dicom(
    path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", **elements: object
) -> Path:
    """A single-frame DX image, explicit VR little endian: 8 bits stored for uint8 `pixels`,
    else 12 bits in 16. `elements` (keyword=value) are set last, so they add or override."""
    eight = pixels.dtype == np.uint8
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "DX"
    dataset.Rows, dataset.Columns = pixels.shape[:2]
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = photometric
    dataset.BitsAllocated = 8 if eight else 16
    dataset.BitsStored = 8 if eight else 12
    dataset.HighBit = dataset.BitsStored - 1
    dataset.PixelRepresentation = 0
    dataset.PixelData = pixels.tobytes() if eight else pixels.astype("<u2").tobytes()
    for keyword, value in elements.items():
        setattr(dataset, keyword, value)
    dataset.save_as(path, enforce_file_format=True)
    return path


def compress(source: Path, path: Path, syntax: UID) -> Path:
    """`source` re-encoded losslessly in `syntax` (RLE natively, JPEG 2000 through openjpeg)."""
    dataset = pydicom.dcmread(source)
    dataset.compress(syntax)
    dataset.save_as(path, enforce_file_format=True)
    return path
