"""The DICOM results of one prediction: the TID 1500 SR and the Grad-CAM secondary capture, each in
a new series of the source's study; the source dataset is never modified."""

from __future__ import annotations

import copy
import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from cxrfusion.atomic import atomic_path
from cxrfusion.dicom.capture import build_sc
from cxrfusion.dicom.identity import ModelIdentity
from cxrfusion.dicom.report import build_sr
from cxrfusion.dicom.stamp import result_uids
from cxrfusion.errors import CxrError
from cxrfusion.inference.classifier import Prediction

# What the results copy from the source (patient, study) or reference (the image); type 2 ones
# may be empty but must be there. Digital X-ray images must also give ImagerPixelSpacing.
REQUIRED = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)
_DX_CLASSES = ("1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1.1")


@dataclass(frozen=True)
class DicomResults:
    """The SR and the secondary capture of one source image."""

    sr: Dataset
    sc: Dataset

    def write(self, folder: Path) -> list[Path]:
        """Save both as `<SOPInstanceUID>.dcm` in `folder`, atomically; returns the paths."""
        paths = []
        for dataset in (self.sr, self.sc):
            path = Path(folder) / f"{dataset.SOPInstanceUID}.dcm"
            with atomic_path(path) as tmp:
                dataset.save_as(tmp, enforce_file_format=True)
            paths.append(path)
        return paths


def check_source(source: Dataset, name: str = "source") -> None:
    """Raise a CxrError naming every attribute the results need and `source` lacks."""
    missing = [keyword for keyword in REQUIRED if keyword not in source]
    if source.get("SOPClassUID") in _DX_CLASSES and "ImagerPixelSpacing" not in source:
        missing.append("ImagerPixelSpacing")
    if missing:
        raise CxrError(f"{name}: cannot write DICOM results, the source lacks {', '.join(missing)}")


def dicom_results(
    prediction: Prediction,
    source_dataset: Dataset,
    model: ModelIdentity,
    created: datetime.datetime,
    parameters: Sequence[str] = (),
) -> DicomResults:
    """The SR and the capture of `prediction` for the image `source_dataset`.

    Args:
        prediction: the model's output for that image (with heatmaps for a Grad-CAM capture).
        source_dataset: the image's dataset (pixels not needed); copied, never modified.
        model: who made it (`identity.ModelIdentity`): names, version, UID root.
        created: the creation date and time to record.
        parameters: "name=value" settings (MC samples, seed, thresholds): part of the
            algorithm's record and of the UIDs, so other settings give other objects.

    Raises:
        CxrError: the source lacks a patient, study or image attribute (all are named).
    """
    check_source(source_dataset, prediction.source)
    source = Dataset()  # the header alone: highdicom copies from it, the pixels stay put
    for element in source_dataset:
        if element.keyword != "PixelData":
            source.add(copy.deepcopy(element))
    uids = result_uids(source.SOPInstanceUID, model, ";".join(parameters))
    sr = build_sr(prediction, source, model, uids, created, parameters)
    sc = build_sc(prediction, source, model, uids, created)
    return DicomResults(sr, sc)
