"""The TID 1500 measurement report (Comprehensive 3D SR) of one prediction: built, never written.

Content tree (docs/dicom.md): observation context (the device: our name and manufacturer, the
architecture as model name), procedure reported (plain chest X-ray), and in Imaging Measurements
one group per pathology (tracking identifier, TID 4019 algorithm identification, the source
image, the finding as finding type) holding the MC-dropout mean and std of its probability, the
operating point's threshold, and whether the finding is present at that point; plus one
whole-image group with the uncertainty score, the review flag and, when the run was calibrated,
the referral.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from cxrfusion.dicom import codes
from cxrfusion.dicom.identity import ModelIdentity
from cxrfusion.dicom.stamp import SERIES_NOTE, SR_SERIES, ResultUids, stamp
from cxrfusion.inference.classifier import Prediction

# An uncalibrated run decides "present" at this mean probability: a plain, documented default
# with no guarantee (run `cxrfusion calibrate` for thresholds with a false-negative bound).
DEFAULT_OPERATING_POINT = 0.5


def operating_point(prediction: Prediction) -> tuple[np.ndarray, np.ndarray]:
    """Per pathology, the decision threshold and whether the finding is present at it: the
    run's conformal thresholds when calibrated, else `DEFAULT_OPERATING_POINT`."""
    calibration = prediction.calibration
    if calibration is None:
        thresholds = np.full(len(prediction.labels), DEFAULT_OPERATING_POINT)
        return thresholds, prediction.probability >= DEFAULT_OPERATING_POINT
    thresholds = np.array([calibration.thresholds[label] for label in prediction.labels])
    return thresholds, np.asarray(prediction.positive, dtype=bool)


def build_sr(
    prediction: Prediction,
    source: Dataset,
    model: ModelIdentity,
    uids: ResultUids,
    created: datetime.datetime,
    parameters: Sequence[str] = (),
) -> hd.sr.Comprehensive3DSR:
    """The SR of `prediction` for the `source` image, in the source's study.

    Args:
        prediction: the model's output for `source` (`Classifier.predict`).
        source: the radiograph's dataset (its pixels are not needed); never modified.
        model: the device and algorithm to name.
        uids: the new series and instance UIDs (`stamp.result_uids`).
        created: the content and creation date/time to record.
        parameters: the algorithm's parameters as "name=value" (MC samples, seed, thresholds).
    """
    algorithm = hd.sr.AlgorithmIdentification(
        name=f"{model.manufacturer} {model.architecture}",
        version=model.version,
        parameters=list(parameters) or None,
    )
    image = hd.sr.SourceImageForMeasurementGroup.from_source_image(source)
    thresholds, present = operating_point(prediction)
    groups = [
        _finding_group(
            prediction,
            i,
            algorithm,
            image,
            (thresholds[i], present[i]),
            _tracking(label, uids, model),
        )
        for i, label in enumerate(prediction.labels)
    ]
    groups.append(_image_group(prediction, algorithm, image, _tracking("image", uids, model)))
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(model),
        procedure_reported=codes.PROCEDURE,
        imaging_measurements=groups,
        title=codes.REPORT_TITLE,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source],
        content=report,
        series_instance_uid=uids.sr_series,
        series_number=SR_SERIES,
        sop_instance_uid=uids.sr_instance,
        instance_number=1,
        manufacturer=model.manufacturer,
        manufacturer_model_name=model.architecture,
        software_versions=model.version,
        series_description=f"cxrfusion findings - {SERIES_NOTE}",
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    return stamp(sr, created)


def _observation_context(model: ModelIdentity) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=model.device_uid,
        name=model.manufacturer,
        manufacturer_name=model.manufacturer,
        model_name=model.architecture,
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DEVICE, observer_identifying_attributes=device
        )
    )


def _tracking(name: str, uids: ResultUids, model: ModelIdentity) -> hd.sr.TrackingIdentifier:
    uid = generate_uid(model.uid_root, [uids.sr_instance, name])
    return hd.sr.TrackingIdentifier(uid=uid, identifier=name)


def _number(name: Code, value: float, derivation: Code | None = None) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=float(value), unit=codes.UNITY, derivation=derivation)


def _finding_group(
    prediction: Prediction,
    i: int,
    algorithm: hd.sr.AlgorithmIdentification,
    image: hd.sr.SourceImageForMeasurementGroup,
    decision: tuple[float, bool],
    tracking: hd.sr.TrackingIdentifier,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    threshold, present = decision
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=codes.PATHOLOGY_CODES[prediction.labels[i]],
        algorithm_id=algorithm,
        source_images=[image],
        measurements=[
            _number(codes.PROBABILITY, prediction.probability[i], codes.MEAN),
            _number(codes.PROBABILITY, prediction.std[i], codes.STANDARD_DEVIATION),
            _number(codes.THRESHOLD, threshold),
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(codes.DECISION, codes.PRESENT if present else codes.ABSENT)
        ],
    )


def _image_group(
    prediction: Prediction,
    algorithm: hd.sr.AlgorithmIdentification,
    image: hd.sr.SourceImageForMeasurementGroup,
    tracking: hd.sr.TrackingIdentifier,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    evaluations = [hd.sr.QualitativeEvaluation(codes.REVIEW_FLAG, _yes_no(prediction.flag))]
    if prediction.referred is not None:
        evaluations.append(
            hd.sr.QualitativeEvaluation(codes.REFERRED, _yes_no(prediction.referred))
        )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=codes.IMAGE_FINDING,
        algorithm_id=algorithm,
        source_images=[image],
        measurements=[
            _number(codes.UNCERTAINTY, prediction.uncertainty),
            _number(codes.THRESHOLD, prediction.threshold),
        ],
        qualitative_evaluations=evaluations,
    )


def _yes_no(value: bool) -> Code:
    return codes.YES if value else codes.NO
