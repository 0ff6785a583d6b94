"""The secondary capture of one prediction: Grad-CAM overlays of the top findings with their
probabilities and the disclaimer burnt in (RGB), referencing the source image. Built, never written."""

from __future__ import annotations

import datetime

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from cxrfusion.dicom.identity import ModelIdentity
from cxrfusion.dicom.report import operating_point
from cxrfusion.dicom.stamp import DISCLAIMER, SC_SERIES, SERIES_NOTE, ResultUids, stamp
from cxrfusion.inference.classifier import GRADCAM_TOP, Prediction

PANEL = 384  # pixels per finding's panel: a 224-px model input shown at a readable size
BAND = 56  # text band above and below the panels
_FONT = 15
# Without an orientation in the source, a frontal chest view is displayed with the patient's
# left on the viewer's right and the feet down.
_DEFAULT_ORIENTATION = ("L", "F")


def build_sc(
    prediction: Prediction,
    source: Dataset,
    model: ModelIdentity,
    uids: ResultUids,
    created: datetime.datetime,
) -> hd.sc.SCImage:
    """The capture of `prediction` for `source`, in the source's study (new series)."""
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=render(prediction, model),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        patient_orientation=_orientation(source),
        series_instance_uid=uids.sc_series,
        series_number=SC_SERIES,
        sop_instance_uid=uids.sc_instance,
        instance_number=1,
        manufacturer=model.manufacturer,
        manufacturer_model_name=model.architecture,
        software_versions=model.version,
        series_description=f"cxrfusion Grad-CAM - {SERIES_NOTE}",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = DISCLAIMER
    sc.DerivationDescription = "Grad-CAM overlays of the most probable findings (cxrfusion)"
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    stamp(sc, created)
    sc.DateOfSecondaryCapture, sc.TimeOfSecondaryCapture = sc.ContentDate, sc.ContentTime
    return sc


def render(prediction: Prediction, model: ModelIdentity) -> np.ndarray:
    """The picture: one panel per top finding (the Grad-CAM overlay when the prediction has
    heatmaps, else the model's input image), captions, and the disclaimer. RGB uint8."""
    _, present = operating_point(prediction)
    order = np.argsort(-prediction.probability, kind="stable")[:GRADCAM_TOP]
    canvas = Image.new("RGB", (PANEL * len(order), PANEL + 2 * BAND), "black")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=_FONT)
    for slot, c in enumerate(order):
        label = prediction.labels[c]
        canvas.paste(_panel(prediction, label), (slot * PANEL, BAND))
        decision = "present" if present[c] else "absent"
        caption = f"{label}: p = {prediction.probability[c]:.2f} +- {prediction.std[c]:.2f}"
        draw.text((slot * PANEL + 6, 6), caption, fill="yellow", font=font)
        draw.text(
            (slot * PANEL + 6, 26), f"{decision} at the operating point", fill="yellow", font=font
        )
    review = "FLAGGED FOR REVIEW (uncertain)" if prediction.flag else "not flagged for review"
    heat = "Grad-CAM" if prediction.heatmaps else "no Grad-CAM (ONNX engine)"
    footer = f"{model.manufacturer} {model.architecture}, {heat}; {review}"
    draw.text((6, PANEL + BAND + 6), footer, fill="white", font=font)
    draw.text((6, PANEL + BAND + 28), DISCLAIMER, fill="red", font=font)
    return np.asarray(canvas)


def _panel(prediction: Prediction, label: str) -> Image.Image:
    heatmap = prediction.heatmaps.get(label)
    if heatmap is None:
        picture = Image.fromarray(prediction.image).convert("RGB")
    else:
        from cxrfusion.explain import overlay  # imports torch: only where heatmaps exist

        picture = Image.fromarray(overlay(prediction.image, heatmap))
    return picture.resize((PANEL, PANEL), Image.Resampling.BILINEAR)


def _orientation(source: Dataset) -> tuple[str, str]:
    value = source.get("PatientOrientation")
    if value is not None and len(value) == 2 and all(value):
        return str(value[0]), str(value[1])
    return _DEFAULT_ORIENTATION
