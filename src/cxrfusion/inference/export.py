"""ONNX export of a trained run: `features.onnx`, a mask-taking `head.onnx` and `model.json`.

An exported graph is fixed, but MC dropout needs a random head. So the head is exported with its
`nn.Dropout` modules replaced by multiplications with explicit mask inputs, one per dropout
layer: the caller draws Bernoulli(1 - p) / (1 - p) masks (what `nn.Dropout` multiplies by in
training) for a stochastic pass, or passes ones for the deterministic one. `features.onnx` runs
once per image, `head.onnx` once on T stacked copies of its output.

    report = export_run("runs/fusion", "runs/fusion/export")   # checked against PyTorch

Nothing is written unless ONNX Runtime reproduces PyTorch within `TOLERANCE`: the export goes to
a temporary folder that is renamed into place only after the check. With `quantize="int8"` the
features graph is then quantised and checked against FP32 (`quantize.quantize_export`).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

import cxrfusion
from cxrfusion.data.dataset import split_datasets
from cxrfusion.data.phantoms import render_phantom
from cxrfusion.data.transforms import normalize, preprocess
from cxrfusion.errors import CxrError
from cxrfusion.inference.masked_head import MaskedHead
from cxrfusion.inference.onnx_engine import FORMAT_VERSION, MODEL_JSON, draw_masks
from cxrfusion.inference.quantize import (
    FEATURES_INT8,
    LabelledImages,
    check_images,
    quantize_export,
)
from cxrfusion.labels import LABELS
from cxrfusion.training.config import TrainConfig

log = logging.getLogger(__name__)

OPSET = 17
# 14: the oldest opset with the attention ops fusion needs; 20: the newest the exporter writes.
OPSETS = range(14, 21)
TOLERANCE = 1e-4  # max abs difference of features and logits, ONNX Runtime vs PyTorch
FEATURES_ONNX = "features.onnx"
QUANTIZATIONS = ("int8",)
HEAD_ONNX = "head.onnx"


@dataclass
class ExportReport:
    """What `export_model` wrote and how closely ONNX Runtime matched PyTorch.

    Args:
        folder: the export folder (model.json, features.onnx, head.onnx).
        max_abs_diff: per check ("features", "logits", "masked_logits"), the largest absolute
            difference between ONNX Runtime and PyTorch on the sample images.
        metadata: the content of model.json.
    """

    folder: Path
    max_abs_diff: dict[str, float]
    metadata: dict = field(repr=False)


def export_model(
    model: nn.Module,
    out: Path | str,
    metadata: dict,
    sample: torch.Tensor,
    opset: int = OPSET,
    tolerance: float = TOLERANCE,
    source: str = "sample images",
    int8: LabelledImages | None = None,
    force: bool = False,
) -> ExportReport:
    """Export a cxrfusion model as features.onnx + head.onnx + model.json, checked on `sample`.

    Args:
        model: a `CxrModel` (`head(features(x))`, all dropout in the head); it is copied to the
            CPU in float32, the given one is left as it is.
        out: the export folder to create; a previous export there (a folder holding
            model.json) is replaced, any other non-empty folder is an error.
        metadata: run facts for model.json (labels, threshold, ...).
        sample: normalised square images (B, 3, S, S) at the model input size S (the size the
            graphs are traced at) for the parity check; B >= 2 also checks that the graphs
            accept another batch size than the traced 1.
        opset: ONNX opset version.
        tolerance: the largest absolute difference accepted between ONNX Runtime and PyTorch.
        source: what the sample images are, for messages and model.json.
        int8: labelled images at the input size to quantise the features graph to INT8 with
            (calibration and check); None keeps FP32.
        force: keep an INT8 graph that fails its check.

    Raises:
        CxrError: the out folder is taken, ONNX Runtime differs from PyTorch by more than
            `tolerance`, or the INT8 graph fails its check without `force` (nothing is written
            then).
    """
    out = Path(out)
    if opset not in OPSETS:
        raise CxrError(f"--opset {opset}: must be {OPSETS.start} to {OPSETS.stop - 1}")
    _check_out(out)
    model = copy.deepcopy(model).float().cpu().eval().to(memory_format=torch.contiguous_format)
    sample = sample.float().cpu().contiguous()
    head = MaskedHead(model.head, model.num_features)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        _export_graphs(model.features, head, tmp, sample.shape[1:], model.num_features, opset)
        diffs = check_parity(model, head, tmp, sample)
        worst = max(diffs.values())
        if not worst <= tolerance:  # also refuses NaN
            detail = ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
            raise CxrError(
                f"{out}: ONNX Runtime differs from PyTorch by {worst:.2e} > {tolerance:g} "
                f"on {source} ({detail}); nothing was written"
            )
        files = {"features": FEATURES_ONNX, "head": HEAD_ONNX}
        quantization = None
        if int8 is not None:
            quantization = quantize_export(
                tmp / FEATURES_ONNX, tmp / HEAD_ONNX, int8, model.mean, model.std, force
            )
            files["features"] = FEATURES_INT8
        metadata = {
            **metadata,
            "format": FORMAT_VERSION,
            "input_size": int(sample.shape[-1]),
            "normalization": {"mean": list(model.mean), "std": list(model.std)},
            "num_features": model.num_features,
            "dropout": [asdict(layer) for layer in head.layers],
            "files": files,
            "quantization": quantization,
            "opset": opset,
            "parity": {
                "max_abs_diff": diffs,
                "tolerance": tolerance,
                "images": len(sample),
                "source": source,
            },
            "versions": _versions(),
        }
        (tmp / MODEL_JSON).write_text(json.dumps(metadata, indent=2, allow_nan=False))
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported to %s; max abs difference %s", out, diffs)
    return ExportReport(out, diffs, metadata)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CxrError(f"{out}: --out exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MODEL_JSON).is_file():
        raise CxrError(f"{out}: --out is a non-empty folder that holds no export; choose another")


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the checked export to `out`, replacing a previous export there."""
    if out.exists():
        old = out.with_name(f".{out.name}.{os.getpid()}.old")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def _export_graphs(
    features: nn.Module,
    head: MaskedHead,
    folder: Path,
    image_shape: torch.Size,
    num_features: int,
    opset: int,
) -> None:
    """Trace both graphs with batch 1 (the check then runs another batch size)."""
    mask_names = [f"mask{i}" for i in range(len(head.layers))]
    batch = {0: "batch"}
    masks = tuple(torch.ones(1, layer.width) for layer in head.layers)
    with warnings.catch_warnings(), torch.no_grad(), _mha_fastpath_off():
        # Tracer warnings are about Python values frozen into the graph: the parity check below
        # is what tells whether that mattered.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            features,
            (torch.zeros(1, *image_shape),),
            str(folder / FEATURES_ONNX),
            dynamo=False,
            opset_version=opset,
            input_names=["image"],
            output_names=["features"],
            dynamic_axes={"image": batch, "features": batch},
        )
        torch.onnx.export(
            head,
            (torch.zeros(1, num_features), *masks),
            str(folder / HEAD_ONNX),
            dynamo=False,
            opset_version=opset,
            input_names=["features", *mask_names],
            output_names=["logits"],
            dynamic_axes={name: batch for name in ["features", *mask_names, "logits"]},
        )
    for name in (FEATURES_ONNX, HEAD_ONNX):
        onnx.checker.check_model(str(folder / name))


@contextmanager
def _mha_fastpath_off() -> Iterator[None]:
    """nn.MultiheadAttention's eval fast path is one fused op that ONNX has no symbol for (the
    fusion model's attention); the regular path exports. The global flag is restored after."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def check_parity(
    model: nn.Module, head: MaskedHead, folder: Path, sample: torch.Tensor
) -> dict[str, float]:
    """Max abs differences, ONNX Runtime vs PyTorch: features, deterministic logits (masks of
    ones, ONNX all the way) and logits of the head under fixed random masks."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sessions = {
        name: ort.InferenceSession(str(folder / name), options, providers=["CPUExecutionProvider"])
        for name in (FEATURES_ONNX, HEAD_ONNX)
    }
    rows = len(sample)
    ones = [np.ones((rows, layer.width), np.float32) for layer in head.layers]
    masks = draw_masks(head.layers, rows, np.random.default_rng(0))
    with torch.no_grad():
        features = model.features(sample)
        logits = model.head(features)  # = model(sample): forward is head(features(x))
        masked = head(features, *map(torch.from_numpy, masks))
    onnx_features = sessions[FEATURES_ONNX].run(None, {"image": sample.numpy()})[0]

    def onnx_head(f: np.ndarray, m: list[np.ndarray]) -> np.ndarray:
        names = {f"mask{i}": mask for i, mask in enumerate(m)}
        return sessions[HEAD_ONNX].run(None, {"features": f, **names})[0]

    def diff(a: np.ndarray, b: torch.Tensor) -> float:
        return float(np.abs(a - b.numpy()).max())

    return {
        "features": diff(onnx_features, features),
        "logits": diff(onnx_head(onnx_features, ones), logits),
        "masked_logits": diff(onnx_head(features.numpy(), masks), masked),
    }


def _versions() -> dict[str, str]:
    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "cxrfusion": cxrfusion.__version__,
    }


def export_run(
    run: Path | str,
    out: Path | str | None = None,
    opset: int = OPSET,
    quantize: str | None = None,
    force: bool = False,
) -> ExportReport:
    """Export a trained run directory (its best.ckpt) for ONNX Runtime; see `export_model`.

    The parity check runs on `parity_images`: images like those the model was trained on; an
    INT8 graph is calibrated and checked on `check_images`, the run's validation split.

    Args:
        run: a run directory written by `cxrfusion train`, or a checkpoint in one.
        out: export folder (default `<run>/export`, where `Classifier.load(run, engine="onnx")`
            looks).
        opset: ONNX opset version.
        quantize: "int8" for an INT8 features graph, None for FP32.
        force: keep an INT8 graph whose macro AUC is beyond the tolerance of FP32's.
    """
    if quantize not in (None, *QUANTIZATIONS):
        raise CxrError(f"--quantize {quantize}: choose {', '.join(QUANTIZATIONS)}")
    if force and quantize is None:
        raise CxrError("--force keeps an INT8 graph that failed its check: use it with --quantize")
    from cxrfusion.inference.runs import load_run, run_card, run_threshold
    from cxrfusion.stats.conformal import load_calibration
    from cxrfusion.stats.temperature import read_temperature

    run = Path(run)
    model, config = load_run(run)
    run = run if run.is_dir() else run.parent  # a checkpoint: its run directory
    images, source = parity_images(run, config)
    int8 = None if quantize is None else check_images(run, config)
    sample = normalize(torch.from_numpy(images)[:, None], model.mean, model.std)
    temperatures = read_temperature(run)
    calibration = load_calibration(run)
    metadata = {
        "model": config.model,
        "labels": list(LABELS),
        "cache_size": config.cache_size,
        "threshold": run_threshold(run),
        "temperatures": None
        if temperatures is None
        else dict(zip(LABELS, temperatures.tolist(), strict=True)),
        "calibration": None if calibration is None else asdict(calibration),
        "card": run_card(run),
        "run": str(run.resolve()),
    }
    return export_model(
        model, out or run / "export", metadata, sample, opset, source=source, int8=int8, force=force
    )


def parity_images(run: Path, config: TrainConfig, count: int = 4) -> tuple[np.ndarray, str]:
    """uint8 (count, S, S) images at the run's input size for the parity check, and what they
    are: the first validation images of the run's cache, topped up (or, when that cache is not at
    hand, replaced) by built-in phantom radiographs.

    Never random noise: a model trained from scratch may amplify input unlike anything it saw
    until float32 rounding shows. Measured on the demo's fusion run (64 px): on uniform noise its
    features reach 617 and ONNX Runtime differs from PyTorch by 2.9 (PyTorch float32 itself by
    3.3 from float64); on its validation images the features stay below 2.2 and differ by 2e-6.
    """
    images: list[np.ndarray] = []
    try:
        val = split_datasets(
            Path(config.prepared),
            config.cache_size,
            config.input_size,
            split_file=run / "split.csv",
        )["val"]
        if len(val):
            samples = val.__getitems__(list(range(min(count, len(val)))))
            images = [image[0].numpy() for image, _, _ in samples]
    except (CxrError, OSError) as error:
        log.info("parity check on phantom radiographs: the run's cache is not at hand (%s)", error)
    found = len(images)
    parts = [f"{found} validation images of {config.prepared}"] if found else []
    if found < count:
        phantoms = [render_phantom([], seed, config.cache_size) for seed in range(count - found)]
        images += [preprocess(p, config.cache_size, config.input_size) for p in phantoms]
        parts.append(f"{count - found} built-in phantom radiographs")
    return np.stack(images), " and ".join(parts)
