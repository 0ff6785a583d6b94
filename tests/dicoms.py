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


DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def chest_dx(
    pixels: np.ndarray, patient: str = "PAT001", study_uid: str | None = None, **elements: object
) -> pydicom.Dataset:
    """A DX For Presentation radiograph as a modality sends it: patient and study attributes,
    ImagerPixelSpacing, a PA chest view; `elements` add or override (e.g. ViewPosition="LL")."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = elements.pop("SOPClassUID", DX_PRESENTATION)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID = f"Test^{patient}", patient
    ds.PatientBirthDate, ds.PatientSex = "19600101", "F"
    ds.StudyDate, ds.StudyTime, ds.StudyID = "20240102", "101500", "1"
    ds.AccessionNumber, ds.ReferringPhysicianName = f"ACC{patient}", ""
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Modality, ds.ViewPosition, ds.BodyPartExamined = "DX", "PA", "CHEST"
    ds.PresentationIntentType, ds.ImagerPixelSpacing = "FOR PRESENTATION", [0.143, 0.143]
    ds.PatientOrientation = ["L", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.astype(np.uint8).tobytes()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def dicom_bytes(dataset: pydicom.Dataset) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


FRONTAL_NIH = ("00000013_019.png", "00000001_000.png")  # PA views in ../shared's NIH sample


def pacs_sources(images: Path) -> dict[str, pydicom.Dataset]:
    """What a PACS test sends: two frontal DX radiographs from real NIH pixels (frontal0,
    frontal1) and three decoys the rules must skip: a lateral, a CT and a Basic Text SR."""
    from PIL import Image

    def pixels(name: str) -> np.ndarray:
        return np.asarray(Image.open(images / name).convert("L"))

    sources = {
        f"frontal{i}": chest_dx(pixels(name), patient=f"P{i}") for i, name in enumerate(FRONTAL_NIH)
    }
    first = pixels(FRONTAL_NIH[0])
    sources["lateral"] = chest_dx(first, patient="P7", ViewPosition="LL")
    sources["ct"] = chest_dx(first, patient="P8", Modality="CT", SOPClassUID=CT_IMAGE)
    report = chest_dx(first, patient="P9", Modality="SR", SOPClassUID=BASIC_TEXT_SR)
    for keyword in ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored"):
        delattr(report, keyword)
    sources["sr"] = report
    return sources
