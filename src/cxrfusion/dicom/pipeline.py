"""The model loop that polling and listening share: screen a header by the rules, predict the
image, build its SR and capture, and say what happened for the audit log."""

from __future__ import annotations

import datetime
import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from cxrfusion.dicom.identity import ModelIdentity
from cxrfusion.dicom.report import DEFAULT_OPERATING_POINT
from cxrfusion.dicom.results import DicomResults, dicom_results
from cxrfusion.dicom.rules import Decision, Rules, evaluate
from cxrfusion.inference.classifier import Classifier, Prediction


@dataclass
class Processed:
    """One image's prediction and results, and the seconds each step took."""

    prediction: Prediction
    results: DicomResults
    timings: dict[str, float] = field(default_factory=dict)


class Processor:
    """Screens and predicts one instance at a time (not thread-safe, like the `Classifier`).

    Args:
        classifier: the loaded model; Grad-CAM captures when its engine supports it.
        model: the identity to write into the results.
        rules: the input selection rules.
        clock: the creation time of results (a test can pin it).
    """

    def __init__(
        self,
        classifier: Classifier,
        model: ModelIdentity,
        rules: Rules,
        clock: Callable[[], datetime.datetime] = datetime.datetime.now,
    ) -> None:
        self.classifier = classifier
        self.model = model
        self.rules = rules
        self.clock = clock
        self.parameters = parameters(classifier)

    def screen(self, header: Dataset) -> Decision:
        """The rules' decision on a header (our own outputs always rejected)."""
        return evaluate(self.rules, header, self.model)

    def process(self, dataset: Dataset) -> Processed:
        """Predict one image (a whole dataset, pixels included) and build its results; each
        image is predicted as batch 0, as `cxrfusion serve` does, so the same image always gets
        the same numbers. Raises CxrError for an image the model cannot read."""
        start = time.perf_counter()
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        source = (f"{dataset.SOPInstanceUID}.dcm", buffer.getvalue())
        prediction = self.classifier.predict(source, gradcam=self.classifier.supports_gradcam)
        predicted = time.perf_counter()
        results = dicom_results(prediction, dataset, self.model, self.clock(), self.parameters)
        timings = {"predict_s": predicted - start, "build_s": time.perf_counter() - predicted}
        return Processed(prediction, results, timings)

    def audit(self, header: Dataset) -> dict:
        """The audit fields every record of `header` shares: UIDs, model and settings."""
        return {
            "study": str(header.get("StudyInstanceUID", "")),
            "series": str(header.get("SeriesInstanceUID", "")),
            "sop_instance_uid": str(header.get("SOPInstanceUID", "")),
            "model": {
                "run": self.model.run,
                "architecture": self.model.architecture,
                "sha256": self.model.sha256,
            },
            "parameters": list(self.parameters),
        }


def parameters(classifier: Classifier) -> tuple[str, ...]:
    """The settings that decide a result's numbers and decisions, as "name=value"."""
    calibration = classifier.spec.calibration
    operating = (
        f"conformal alpha={calibration.alpha:g} referral_alpha={calibration.referral_alpha:g}"
        if calibration is not None
        else f"default {DEFAULT_OPERATING_POINT:g}"
    )
    return (
        f"mc_samples={classifier.mc_samples}",
        f"seed={classifier.seed}",
        f"review_threshold={classifier.threshold:g}",
        f"operating_point={operating}",
    )
