"""The Python API: `Classifier.load("runs/fusion").predict("x.dcm")`.

A source (file path, uploaded bytes or array) is decoded and brought to model input by
`transforms.preprocess` and `transforms.normalize`, the functions training and evaluation use, so a
file gets exactly the pixels the model was trained on. Nothing here imports torch: with the ONNX
engine, prediction runs on ONNX Runtime and NumPy alone. An engine returns MC-dropout logits; the
run's temperatures, the uncertainty summary and the review flag are computed here with evaluate's
code (`evaluation.uncertainty`), and, when the run was calibrated (`cxrfusion calibrate`), the
conformal decisions and referral with `evaluation.conformal.apply_calibration`.
"""

from __future__ import annotations

import base64
import importlib
import io
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy.special import expit

from cxrfusion.data.imageio import read_radiograph
from cxrfusion.data.pixels import minmax_to_uint8
from cxrfusion.data.transforms import normalize, preprocess
from cxrfusion.errors import CxrError
from cxrfusion.inference.engines import ENGINE_LOADERS, Engine, ModelSpec
from cxrfusion.stats.conformal import Calibration, apply_calibration
from cxrfusion.stats.temperature import apply_temperature
from cxrfusion.stats.uncertainty import flag, summarise_samples

log = logging.getLogger(__name__)

Source = str | Path | tuple[str, bytes] | np.ndarray
CONFORMAL_BOUND = (
    "expected false-negative rate <= alpha per pathology (conformal risk control, validation split)"
)
BLANK_WARNING = "blank image: every pixel has the same value, there is nothing to read"
GRADCAM_TOP = 3  # heatmaps for the most probable pathologies only: one backward pass each
INTENDED_USE = (
    "Research use: multi-label screening of frontal chest radiographs for the 14 ChestX-ray14 "
    "findings, with an uncertainty score that flags images for human review."
)
LIMITS = (
    "Not a medical device; not for diagnosis or treatment decisions. Trained on the data named "
    "here only: performance on other populations, scanners or lateral views is unknown. "
    "NIH ChestX-ray14 labels were mined from reports and are noisy."
)


@dataclass
class Prediction:
    """The prediction for one image (arrays in `labels` order).

    Attributes:
        source: file path, upload name, or "array[i]".
        probability: (14,) MC-dropout mean probability (after the run's temperatures, if saved).
        std: (14,) MC-dropout standard deviation.
        entropy: (14,) predictive binary entropy of the mean (nats).
        mutual_information: (14,) BALD: the part of the entropy due to the model's uncertainty.
        uncertainty: mean of the 14 stds (evaluate's score).
        flag: uncertainty > threshold: a human should review this image.
        warning: "" or why to distrust the prediction (e.g. a lateral DICOM).
        image: uint8 (H, W) at the model's input size: what the model saw.
        heatmaps: label -> Grad-CAM heatmap (H, W) in [0, 1], only when asked for.
        threshold: the review threshold used for `flag`.
        labels: the pathology names.
        calibration: the run's conformal calibration, or None (then `positive` and `referred`
            are None too).
        positive: (14,) bool: probability >= the pathology's conformal threshold, so that the
            expected false-negative rate is at most `calibration.alpha`.
        referred: uncertainty >= the conformal referral threshold: send to a radiologist.
    """

    source: str
    probability: np.ndarray
    std: np.ndarray
    entropy: np.ndarray
    mutual_information: np.ndarray
    uncertainty: float
    flag: bool
    warning: str
    image: np.ndarray
    heatmaps: dict[str, np.ndarray] = field(default_factory=dict)
    threshold: float = 0.1
    labels: tuple[str, ...] = ()
    calibration: Calibration | None = None
    positive: np.ndarray | None = None
    referred: bool | None = None

    def to_dict(self, heatmap_png: bool = False) -> dict:
        """JSON-ready: source, uncertainty, flag, threshold, warning, one entry per pathology,
        when calibrated the conformal decisions with their bound (`conformal`), and with
        `heatmap_png` each heatmap as a base64 PNG overlay on the model's input image."""
        out = {
            "source": self.source,
            "uncertainty": float(self.uncertainty),
            "flag": bool(self.flag),
            "threshold": float(self.threshold),
            "warning": self.warning,
            "pathologies": [
                {
                    "label": label,
                    "probability": float(self.probability[i]),
                    "std": float(self.std[i]),
                    "entropy": float(self.entropy[i]),
                    "mutual_information": float(self.mutual_information[i]),
                }
                for i, label in enumerate(self.labels)
            ],
        }
        if self.calibration is not None:
            out["conformal"] = {
                "alpha": self.calibration.alpha,
                "referral_alpha": self.calibration.referral_alpha,
                "referred": bool(self.referred),
                "positive": [
                    label for label, p in zip(self.labels, self.positive, strict=True) if p
                ],
                "bound": CONFORMAL_BOUND,
            }
        if heatmap_png and self.heatmaps:
            out["heatmaps"] = {
                label: base64.b64encode(overlay_png(self.image, heatmap)).decode("ascii")
                for label, heatmap in self.heatmaps.items()
            }
        return out


def overlay_png(image: np.ndarray, heatmap: np.ndarray) -> bytes:
    """PNG bytes of a Grad-CAM heatmap blended over the grayscale image."""
    from cxrfusion.explain import overlay

    buffer = io.BytesIO()
    Image.fromarray(overlay(image, heatmap)).save(buffer, format="PNG")
    return buffer.getvalue()


class Predictions(list):
    """A list of `Prediction`s, in input order."""

    def to_frame(self) -> pd.DataFrame:
        """evaluate's predictions.csv columns without the truths: `source` for the image and
        patient columns, the 14 mean probabilities, the 14 `<label>_std`, `uncertainty`, `flag`
        (0/1), plus `warning`; when calibrated, `referred` and `positive_<label>` (0/1)."""
        rows = []
        for p in self:
            row = {"source": p.source}
            row |= dict(zip(p.labels, p.probability.tolist(), strict=True))
            row |= {f"{label}_std": v for label, v in zip(p.labels, p.std.tolist(), strict=True)}
            row |= {"uncertainty": p.uncertainty, "flag": int(p.flag), "warning": p.warning}
            if p.calibration is not None:
                row["referred"] = int(p.referred)
                row |= {
                    f"positive_{label}": int(v)
                    for label, v in zip(p.labels, p.positive, strict=True)
                }
            rows.append(row)
        return pd.DataFrame(rows)


@dataclass(frozen=True)
class PreparedImage:
    """A decoded source at model input size (`Classifier.prepare`)."""

    source: str
    image: np.ndarray
    warning: str = ""


class Classifier:
    """A trained model ready to predict radiographs, with MC-dropout uncertainty.

    Use `Classifier.load(run)`; the constructor takes an engine and its spec. Not thread-safe:
    MC dropout switches the shared model's dropout on and off, so threads share one instance
    behind a lock or a single worker (as `cxrfusion serve` does).

    Args:
        engine: computes logits (`engines.Engine`).
        spec: labels, sizes, normalisation, threshold and temperatures of the model.
        mc_samples: T dropout samples per image (25 in the report; 1 for a quick answer).
        threshold: review threshold on the uncertainty score (default: the spec's).
        seed: seeds the dropout masks: batch k of a `predict_many` call uses seed + k, as
            `evaluate`'s batches do, so the same sources in the same batches always give the same
            numbers (on the torch engine, evaluate's numbers for the same seed and batch size).
    """

    def __init__(
        self,
        engine: Engine,
        spec: ModelSpec,
        mc_samples: int = 25,
        threshold: float | None = None,
        seed: int = 0,
    ) -> None:
        if mc_samples < 1:
            raise CxrError(f"--mc-samples must be >= 1, got {mc_samples}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise CxrError(f"--seed must be an integer in [0, 2**32), got {seed!r}")
        if threshold is not None and not 0.0 <= threshold <= 0.5:
            raise CxrError(
                f"--threshold must be in [0, 0.5] (a std of probabilities), got {threshold}"
            )
        self.engine = engine
        self.spec = spec
        self.labels = spec.labels
        self.input_size = spec.input_size
        self.mc_samples = mc_samples
        self.threshold = spec.threshold if threshold is None else float(threshold)
        self.seed = seed
        fitted = spec.calibration
        if fitted is not None and (fitted.mc_samples != mc_samples or fitted.mc_mode != "head"):
            log.warning(
                "calibration.json was fitted with %d MC-dropout samples (%s), this classifier "
                "draws %d (head): its conformal bound holds for the calibrated setting only",
                fitted.mc_samples,
                fitted.mc_mode,
                mc_samples,
            )

    @classmethod
    def load(
        cls,
        run: str | Path,
        engine: str = "torch",
        device: str | None = None,
        mc_samples: int = 25,
        threshold: float | None = None,
        seed: int = 0,
    ) -> Classifier:
        """Load a run directory (or, with engine="onnx", an export) for prediction.

        Args:
            run: run directory (its best.ckpt), or what the chosen engine loads.
            engine: "torch" or "onnx" (`engines.ENGINE_LOADERS`).
            device: "cpu", "cuda", ...; default: CUDA when available.
        """
        if engine not in ENGINE_LOADERS:
            raise CxrError(f"--engine {engine!r}: choose one of {', '.join(ENGINE_LOADERS)}")
        module, function = ENGINE_LOADERS[engine]
        try:
            loader = getattr(importlib.import_module(module), function)
        except ModuleNotFoundError as error:
            raise CxrError(f"--engine {engine}: not available ({error})") from None
        backend, spec = loader(Path(run), device)
        return cls(backend, spec, mc_samples, threshold, seed)

    def prepare(self, source: Source, name: str | None = None) -> PreparedImage:
        """Decode one source and bring it to the model's input size (uint8).

        Args:
            source: a path to a PNG/JPEG/DICOM, a `(name, bytes)` upload, or a uint8/uint16
                array (H, W) (uint16 is stretched from its own range, like a 16-bit PNG).
            name: what to call an array in the output (default "array").

        Raises:
            CxrError: the source cannot be decoded; the message names it.
        """
        if isinstance(source, np.ndarray):
            label = name or "array"
            pixels, warning = _array_pixels(source, label), ""
        elif isinstance(source, tuple):
            label, data = source
            decoded = read_radiograph(data, name=label)
            pixels, warning = decoded.pixels, decoded.warning
        elif isinstance(source, str | Path):
            label = str(source)
            decoded = read_radiograph(source)
            pixels, warning = decoded.pixels, decoded.warning
        else:
            raise TypeError(f"cannot predict a {type(source).__name__}")
        image = preprocess(pixels, self.spec.cache_size, self.spec.input_size)
        if image.min() == image.max():
            warning = "; ".join(filter(None, [warning, BLANK_WARNING]))
        return PreparedImage(label, image, warning)

    def predict(self, source: Source, gradcam: bool = False) -> Prediction:
        """Predict one image (see `prepare` for the sources)."""
        return self.predict_many([source], batch_size=1, gradcam=gradcam)[0]

    def predict_many(
        self, sources: Iterable[Source], batch_size: int = 32, gradcam: bool = False
    ) -> Predictions:
        """Predict many images in batches, in order; a source that cannot be decoded raises.

        Args:
            sources: paths, `(name, bytes)` uploads or arrays (see `prepare`).
            batch_size: images per engine call.
            gradcam: add Grad-CAM heatmaps of the 3 most probable pathologies (torch engine).
        """
        out = Predictions()
        for index, chunk in enumerate(_batches(list(sources), batch_size)):
            prepared = [
                self.prepare(s, name=f"array[{index * batch_size + i}]")
                for i, s in enumerate(chunk)
            ]
            out.extend(self.predict_prepared(prepared, self.seed + index, gradcam))
        return out

    def predict_prepared(
        self,
        images: Sequence[PreparedImage],
        seed: int | None = None,
        gradcam: bool = False,
        *,
        independent: bool = False,
    ) -> list[Prediction]:
        """Predict already prepared images as one batch.

        Args:
            seed: seeds this batch's dropout masks (default: the classifier's `seed`).
            independent: False (evaluate's way, and `predict_many`'s): one generator draws the
                whole batch's masks, so an image's samples depend on its batch. True (what the
                service's dynamic batches need): each image's masks come from a generator of its
                own seeded with `seed`, and it is summarised on its own, so each prediction is the
                one `predict_prepared([image], seed)` gives alone, whatever else is in the batch
                (up to the float rounding of the backbone, which oneDNN and cuDNN vary with the
                batch size: below 1e-6 in probability here).
        """
        if not images:
            return []
        if gradcam and not self.supports_gradcam:
            raise CxrError("Grad-CAM needs the torch engine (--engine torch)")
        x = self.model_input(np.stack([p.image for p in images]))
        seed = self.seed if seed is None else seed
        if not independent:
            logits = self.engine.sample_logits(x, self.mc_samples, seed)
            return self._predictions(images, logits, x, gradcam)
        logits = self.engine.sample_logits_each(x, self.mc_samples, [seed] * len(images))
        return [
            self._predictions([image], logits[:, i : i + 1], x[i : i + 1], gradcam)[0]
            for i, image in enumerate(images)
        ]

    def _predictions(
        self,
        images: Sequence[PreparedImage],
        sample_logits: np.ndarray,
        x: np.ndarray,
        gradcam: bool,
    ) -> list[Prediction]:
        """Summarise the engine's (T, B, 14) logits of `images` (model input `x`)."""
        logits = np.ascontiguousarray(sample_logits, dtype=np.float64)
        unscaled = summary = summarise_samples(expit(logits))
        if self.spec.temperatures is not None:
            summary = summarise_samples(apply_temperature(logits, self.spec.temperatures))
        flags = flag(summary["uncertainty"], self.threshold)
        calibration = self.spec.calibration
        if calibration is not None:  # fitted on unscaled means, as calibrate computes them
            positive, referred = apply_calibration(
                unscaled["mean"], unscaled["uncertainty"], calibration
            )
        predictions = []
        for i, prepared in enumerate(images):
            prediction = Prediction(
                source=prepared.source,
                probability=summary["mean"][i],
                std=summary["std"][i],
                entropy=summary["predictive_entropy"][i],
                mutual_information=summary["mutual_information"][i],
                uncertainty=float(summary["uncertainty"][i]),
                flag=bool(flags[i]),
                warning=prepared.warning,
                image=prepared.image,
                threshold=self.threshold,
                labels=self.labels,
            )
            if calibration is not None:
                prediction.calibration = calibration
                prediction.positive = positive[i]
                prediction.referred = bool(referred[i])
            if gradcam:
                prediction.heatmaps = self._heatmaps(x[i : i + 1], prediction.probability)
            predictions.append(prediction)
        return predictions

    def explain(self, prediction: Prediction) -> dict[str, np.ndarray]:
        """Grad-CAM heatmaps of the 3 most probable findings of a prediction made without them."""
        if not self.supports_gradcam:
            raise CxrError("Grad-CAM needs the torch engine (--engine torch)")
        return self._heatmaps(self.model_input(prediction.image[None]), prediction.probability)

    @property
    def supports_gradcam(self) -> bool:
        """Whether the engine can give Grad-CAM heatmaps (it needs gradients: torch only)."""
        return hasattr(self.engine, "gradcam")

    def model_input(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W) at input size -> float32 (B, 3, H, W) normalised for the model."""
        return normalize(np.ascontiguousarray(images)[:, None], self.spec.mean, self.spec.std)

    def _heatmaps(self, x: np.ndarray, probability: np.ndarray) -> dict[str, np.ndarray]:
        top = np.argsort(-probability, kind="stable")[:GRADCAM_TOP]
        return {self.labels[c]: self.engine.gradcam(x, int(c)) for c in top}

    def card(self) -> dict:
        """The model card: what the model is, what it was trained and validated on, its
        threshold, temperatures and conformal calibration (when calibrated), and its intended use
        and limits."""
        spec = self.spec
        temperatures = (
            None
            if spec.temperatures is None
            else dict(zip(self.labels, spec.temperatures.tolist(), strict=True))
        )
        card = {
            "labels": list(self.labels),
            "architecture": spec.model,
            "input_size": spec.input_size,
            "cache_size": spec.cache_size,
            "normalization": {"mean": list(spec.mean), "std": list(spec.std)},
            **spec.details,
            "threshold": self.threshold,
            "mc_samples": self.mc_samples,
            "temperatures": temperatures,
            "intended_use": INTENDED_USE,
            "limits": LIMITS,
        }
        if spec.calibration is not None:
            card["conformal"] = {**asdict(spec.calibration), "bound": CONFORMAL_BOUND}
        return card


def _array_pixels(array: np.ndarray, name: str) -> np.ndarray:
    """A uint8 or uint16 (H, W) array as uint8, converted like `read_image` converts files."""
    if array.ndim != 2 or array.dtype not in (np.uint8, np.uint16):
        raise CxrError(
            f"{name}: expected a uint8 or uint16 (H, W) array, got {array.dtype} {array.shape}"
        )
    return np.ascontiguousarray(array) if array.dtype == np.uint8 else minmax_to_uint8(array)


def _batches(items: list, size: int) -> Iterator[list]:
    if size < 1:
        raise CxrError(f"--batch-size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]
