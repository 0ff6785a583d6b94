"""Static INT8 quantisation of an export's features graph, checked against FP32 on labelled images.

    data = check_images(run, config)                               # the run's validation split
    entry = quantize_export(features, head, data, model.mean, model.std)  # model.json's entry

`features.onnx` becomes `features.int8.onnx` (ONNX Runtime's `quantize_static`, QDQ format,
per-channel s8 weights, u8 activations, ranges calibrated on the first validation images, the
first convolution kept FP32); the
head stays FP32, so MC dropout is unchanged. The INT8 graph is kept only if the deterministic
macro AUC on the check images is within `AUC_TOLERANCE` of FP32's (or when forced).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from scipy.special import expit

from cxrfusion.data.dataset import split_datasets
from cxrfusion.data.phantoms import render_phantom
from cxrfusion.data.transforms import Triple, normalize, preprocess
from cxrfusion.errors import CxrError
from cxrfusion.labels import LABELS
from cxrfusion.stats.metrics import macro_auc, per_class_auc
from cxrfusion.training.config import TrainConfig

log = logging.getLogger(__name__)

AUC_TOLERANCE = 0.005  # largest accepted |macro AUC INT8 - macro AUC FP32| on the check images
CALIBRATION_IMAGES = 64  # the first check images set the activation ranges
PHANTOMS = 200  # labelled phantom radiographs when the run's cache is not at hand
BATCH = 16
FEATURES_INT8 = "features.int8.onnx"
# What quantize_static is called with (recorded in model.json), ONNX Runtime's default op types.
# Measured (docs/benchmarks.md): QDQ and QOperator ran alike; u8 weights, s8 activations or
# reduce_range were slower, and quantising Conv alone slower still (Q/DQ around every other op).
# The first Conv stays FP32 (`quantize_graph`): on CPUs without VNNI, u8 x s8 products are summed
# in int16 pairs that saturate on the image's wide range; quantised, it moved the tests' model's
# macro AUC by 0.0126, kept, by 0.0003 (Percentile, Entropy or more calibration images: >= 0.011).
SETTINGS = {
    "quant_format": QuantFormat.QDQ,
    "per_channel": True,
    "activation_type": QuantType.QUInt8,
    "weight_type": QuantType.QInt8,
    "calibrate_method": CalibrationMethod.MinMax,
}


@dataclass(frozen=True)
class LabelledImages:
    """Images to calibrate and check an INT8 graph on.

    Args:
        images: uint8 (N, S, S) at the model input size.
        labels: (N, 14) 0/1 in LABELS order.
        source: what they are, for messages and model.json.
    """

    images: np.ndarray
    labels: np.ndarray
    source: str


@dataclass(frozen=True)
class Int8Check:
    """Deterministic (dropout off) predictions of the INT8 graph against FP32's.

    Args:
        auc_fp32 / auc_int8: macro AUC of each against the labels.
        auc_difference: |auc_int8 - auc_fp32|.
        max_probability_difference: the largest |p_int8 - p_fp32| over images and classes.
        images: how many images were compared; source: what they are.
        tolerance: the largest accepted |auc_int8 - auc_fp32|.
    """

    auc_fp32: float
    auc_int8: float
    auc_difference: float
    max_probability_difference: float
    images: int
    source: str
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.auc_difference <= self.tolerance  # NaN fails

    def summary(self) -> str:
        return (
            f"INT8 vs FP32 on {self.images} {self.source}: macro AUC {self.auc_int8:.4f} vs "
            f"{self.auc_fp32:.4f} (difference {self.auc_difference:.4f}, tolerance "
            f"{self.tolerance:g}), largest probability difference "
            f"{self.max_probability_difference:.4f}"
        )


def check_images(run: Path, config: TrainConfig, phantoms: int = PHANTOMS) -> LabelledImages:
    """The run's validation split, or `phantom_images` when the run's cache is not at hand."""
    try:
        val = split_datasets(
            Path(config.prepared),
            config.cache_size,
            config.input_size,
            split_file=run / "split.csv",
        )["val"]
        if len(val):
            samples = val.__getitems__(range(len(val)))
            images = np.stack([image[0].numpy() for image, _, _ in samples])
            source = f"validation images of {config.prepared}"
            return LabelledImages(images, val.targets.numpy(), source)
    except (CxrError, OSError) as error:
        log.info("INT8 check on phantom radiographs: the run's cache is not at hand (%s)", error)
    return phantom_images(phantoms, config.cache_size, config.input_size)


def phantom_images(count: int, cache_size: int, input_size: int) -> LabelledImages:
    """`count` built-in phantom radiographs, each label present with probability 0.3 (seeded),
    rendered at `cache_size` and brought to `input_size` as training images are."""
    labels = np.random.default_rng(0).random((count, len(LABELS))) < 0.3
    images = [
        preprocess(
            render_phantom([LABELS[c] for c in np.flatnonzero(row)], seed, cache_size),
            cache_size,
            input_size,
        )
        for seed, row in enumerate(labels)
    ]
    return LabelledImages(
        np.stack(images), labels.astype(np.float32), "built-in phantom radiographs"
    )


def quantize_export(
    features: Path,
    head: Path,
    data: LabelledImages,
    mean: Triple,
    std: Triple,
    force: bool = False,
    tolerance: float | None = None,
) -> dict:
    """Replace an export's FP32 features graph by a checked INT8 one, `FEATURES_INT8` beside it.

    Args:
        features / head: the FP32 graphs of an export being written.
        data: calibration (the first `CALIBRATION_IMAGES`) and check images.
        mean / std: the model's input normalisation.
        force: keep the INT8 graph even when the check fails (recorded in the entry).
        tolerance: the largest accepted macro AUC difference, INT8 vs FP32 (default
            `AUC_TOLERANCE`).

    Returns:
        model.json's "quantization" entry: settings, sizes and the check's figures.

    Raises:
        CxrError: the check failed and `force` is off; the FP32 graph is left as it was.
    """
    int8 = features.with_name(FEATURES_INT8)
    calibration = normalize(data.images[:CALIBRATION_IMAGES, None], mean, std)
    quantize_graph(features, int8, calibration)
    tolerance = AUC_TOLERANCE if tolerance is None else tolerance
    check = check_int8(features, int8, head, data, mean, std, tolerance)
    log.info("%s", check.summary())
    if not check.passed and not force:
        int8.unlink()
        raise CxrError(
            f"{check.summary()}: beyond the tolerance; nothing was written (--force keeps it)"
        )
    sizes = {"fp32": features.stat().st_size, "int8": int8.stat().st_size}
    features.unlink()
    return {
        "type": "int8",
        "settings": {
            **{key: str(value) for key, value in SETTINGS.items()},
            "fp32_nodes": "the first Conv",
        },
        "calibration_images": len(calibration),
        "bytes": sizes,
        "check": asdict(check),
        "passed": check.passed,
        "forced": force and not check.passed,
    }


def quantize_graph(fp32: Path, int8: Path, calibration: np.ndarray) -> None:
    """Quantise a features graph with `SETTINGS` but its first Conv, activation ranges from
    `calibration` (normalised float32 (N, 3, S, S))."""
    batches = iter([calibration[i : i + BATCH] for i in range(0, len(calibration), BATCH)])

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict | None:
            batch = next(batches, None)
            return None if batch is None else {"image": batch}

    first_conv = next(n.name for n in onnx.load(fp32).graph.node if n.op_type == "Conv")
    with _root_warnings_hidden():
        quantize_static(str(fp32), str(int8), Reader(), nodes_to_exclude=[first_conv], **SETTINGS)


@contextmanager
def _root_warnings_hidden() -> Iterator[None]:
    """ONNX Runtime's quantiser warns on the root logger about every weight it keeps per tensor
    (each BatchNorm's: dozens of lines nobody can act on); they show with -v (root at INFO) only.
    A NullHandler keeps `logging.warning` from installing a stderr handler of its own meanwhile."""
    root = logging.getLogger()
    level, quiet = root.level, logging.NullHandler()
    root.addHandler(quiet)
    if level > logging.INFO or level == logging.NOTSET:
        root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
        root.removeHandler(quiet)


def check_int8(
    fp32: Path,
    int8: Path,
    head: Path,
    data: LabelledImages,
    mean: Triple,
    std: Triple,
    tolerance: float = AUC_TOLERANCE,
) -> Int8Check:
    """Deterministic probabilities through `head` after each features graph, on `data`."""
    head_session = _session(head)
    ones = {
        put.name: np.ones((1, put.shape[1]), np.float32) for put in head_session.get_inputs()[1:]
    }

    def probabilities(features: Path) -> np.ndarray:
        session, out = _session(features), []
        for start in range(0, len(data.images), BATCH):
            x = normalize(data.images[start : start + BATCH, None], mean, std)
            f = session.run(None, {"image": x})[0]
            masks = {name: np.repeat(mask, len(f), axis=0) for name, mask in ones.items()}
            out.append(expit(head_session.run(None, {"features": f, **masks})[0]))
        return np.concatenate(out)

    p32, p8 = probabilities(fp32), probabilities(int8)
    auc32, auc8 = (macro_auc(per_class_auc(data.labels, p)) for p in (p32, p8))
    return Int8Check(
        auc_fp32=auc32,
        auc_int8=auc8,
        auc_difference=abs(auc8 - auc32),
        max_probability_difference=float(np.abs(p8 - p32).max()),
        images=len(data.images),
        source=data.source,
        tolerance=tolerance,
    )


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # beside torch
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
