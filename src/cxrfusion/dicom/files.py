"""DICOM results for `cxrfusion predict`: screen DICOM files by the rules (`--strict`), and write
an SR and a capture for each predicted DICOM file (`--dicom-out`)."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from cxrfusion.data.imageio import DICOM_SUFFIXES
from cxrfusion.dicom.identity import ModelIdentity
from cxrfusion.dicom.pipeline import parameters
from cxrfusion.dicom.results import dicom_results
from cxrfusion.dicom.rules import Rules, evaluate
from cxrfusion.errors import CxrError
from cxrfusion.inference.classifier import Classifier, Prediction


def is_dicom_file(path: Path) -> bool:
    """By suffix or by the DICM marker after the preamble."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    with path.open("rb") as handle:
        return handle.read(132)[128:] == b"DICM"


def screen_files(
    paths: Sequence[Path], rules: Rules, model: ModelIdentity
) -> tuple[list[Path], list[tuple[str, str]]]:
    """The files the rules accept (PNG/JPEG have no header and pass), and (file, reason) for
    the DICOM files they reject."""
    accepted, refused = [], []
    for path in paths:
        if not is_dicom_file(path):
            accepted.append(path)
            continue
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError) as error:
            refused.append((str(path), f"{path}: not a readable DICOM file ({error})"))
            continue
        decision = evaluate(rules, header, model)
        if decision.accepted:
            accepted.append(path)
        else:
            refused.append((str(path), f"{path}: refused by {rules.origin}: {decision.reason}"))
    return accepted, refused


def write_file_results(
    classifier: Classifier,
    predictions: Sequence[Prediction],
    folder: Path,
    model: ModelIdentity,
) -> tuple[list[Path], list[tuple[str, str]]]:
    """An SR and a capture in `folder` for each prediction of a DICOM file (Grad-CAM when the
    engine has it); the files written, and (file, reason) for sources lacking attributes."""
    written, failures = [], []
    created = datetime.datetime.now()
    for prediction in predictions:
        path = Path(prediction.source)
        if not path.is_file() or not is_dicom_file(path):
            continue
        if classifier.supports_gradcam and not prediction.heatmaps:
            prediction.heatmaps = classifier.explain(prediction)
        source = pydicom.dcmread(path, stop_before_pixels=True)
        try:
            results = dicom_results(prediction, source, model, created, parameters(classifier))
        except CxrError as error:
            failures.append((str(path), str(error)))
            continue
        written.extend(results.write(folder))
    return written, failures
