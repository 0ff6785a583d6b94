"""The model loop that polling and listening share: screen a header by the rules, predict the
image, build its SR and capture, store them, and record what happened in the state and the audit
log. Only how an instance arrives and how its results leave differ (`Steps`)."""

from __future__ import annotations

import datetime
import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from cxrfusion.dicom.audit import AuditLog
from cxrfusion.dicom.identity import ModelIdentity
from cxrfusion.dicom.report import DEFAULT_OPERATING_POINT
from cxrfusion.dicom.results import DicomResults, dicom_results
from cxrfusion.dicom.rules import Decision, Rules, evaluate
from cxrfusion.dicom.state import State
from cxrfusion.errors import CxrError
from cxrfusion.inference.classifier import Classifier, Prediction

log = logging.getLogger(__name__)


class Transient(Exception):
    """A failure worth trying again later (a dropped connection, a busy or refusing peer); its
    message is the reason, on one line."""


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


@dataclass(frozen=True)
class Steps:
    """How one instance arrives and how its results leave.

    Attributes:
        header: the instance's header, for the rules (pixels not needed).
        dataset: the whole instance, pixels included (called only when the rules accept it).
        send: stores the SR and the capture at the destination.
    Each raises `Transient` for what a later attempt may cure, CxrError for what it cannot.
    """

    header: Callable[[], Dataset]
    dataset: Callable[[], Dataset]
    send: Callable[[DicomResults], None]


class Intake:
    """One instance from arrival to stored results, recorded once in the state and audit log.

    Args:
        processor: the model loop.
        state: what was done to each instance; written by this object's thread only.
        audit: the JSON-lines audit log.
        fatal: errors that must stop the caller instead of failing the instance (e.g. refused
            credentials: nothing else will work either).
        retry_note: when a failed instance is tried again, for the log ("next poll").
    """

    def __init__(
        self,
        processor: Processor,
        state: State,
        audit: AuditLog,
        fatal: tuple[type[Exception], ...] = (),
        retry_note: str = "next poll",
    ) -> None:
        self.processor = processor
        self.state = state
        self.audit = audit
        self.fatal = fatal
        self.retry_note = retry_note

    def handle(self, ids: Dataset, steps: Steps) -> str:
        """Screen, predict, store and record one instance, whose UIDs `ids` gives; the status
        (processed, skipped, retry or failed)."""
        start = time.perf_counter()
        sop = str(ids.SOPInstanceUID)
        base = self.processor.audit(ids)
        model = self.processor.model.version
        try:
            decision = self.processor.screen(steps.header())
            if not decision.accepted:
                return self.record(sop, "skipped", decision.reason, base, start)
            done = self.processor.process(steps.dataset())
            outputs = (done.results.sr.SOPInstanceUID, done.results.sc.SOPInstanceUID)
            # The UIDs are kept before sending: a retry resends the very same objects.
            self.state.advance(sop, "processing", model=model, outputs=outputs)
            stored = time.perf_counter()
            steps.send(done.results)
            for uid in outputs:  # never read back as an input
                self.state.advance(uid, "skipped", "our own output", model)
            details = {
                "outputs": list(outputs),
                "warnings": list(decision.warnings),
                "uncertainty": done.prediction.uncertainty,
                "flag": done.prediction.flag,
                "timings": {**done.timings, "store_s": time.perf_counter() - stored},
            }
            return self.record(sop, "processed", "", {**base, **details}, start, outputs)
        except self.fatal:
            raise
        except Transient as error:
            return self.record(sop, "failed", str(error), base, start)
        except CxrError as error:  # the image itself: trying again cannot help
            return self.record(sop, "failed", str(error), base, start, retry=False)

    def record(
        self,
        sop: str,
        to: str,
        reason: str,
        record: dict,
        start: float,
        outputs: tuple[str, ...] = (),
        retry: bool = True,
    ) -> str:
        """Move `sop` to `to` with its audit record (and its total time since `start`), write
        the record to the log; the status, "retry" for a failure to be tried again."""
        timings = {**record.get("timings", {}), "total_s": time.perf_counter() - start}
        record = {**record, "reason": reason, "timings": timings}
        stored = self.state.advance(
            sop,
            to,
            reason,
            model=self.processor.model.version,
            outputs=outputs,
            audit=record,
            retry=retry,
        )
        self.audit.write(stored)
        if stored["status"] == "processing":
            log.warning(
                "%s: %s (attempt %d, tried again %s)",
                sop,
                reason,
                stored["attempts"],
                self.retry_note,
            )
            return "retry"
        if to != "processed":
            log.info("%s %s: %s", sop, stored["status"], reason)
        return stored["status"]
