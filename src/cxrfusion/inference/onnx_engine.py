"""Run an export of `cxrfusion export` on ONNX Runtime alone (no torch), MC dropout included.

    engine = OnnxEngine("runs/fusion/export")
    logits = engine.logits(x)                                        # (B, 14), dropout off
    samples = engine.sample_logits(x, 25, seed=0)                    # (25, B, 14)

`features.onnx` runs once per image; `head.onnx` runs once on the T stacked copies of the
features, with each dropout layer's mask drawn here: Bernoulli(1 - p) / (1 - p), exactly what
`nn.Dropout` multiplies by in training, so the samples follow PyTorch's MC-dropout distribution.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from cxrfusion.data.transforms import check_model_input
from cxrfusion.errors import CxrError
from cxrfusion.inference.engines import ModelSpec
from cxrfusion.stats.conformal import calibration_from_dict

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MODEL_JSON = "model.json"
REQUIRED_KEYS = {"labels", "input_size", "normalization", "dropout", "files"}


@dataclass(frozen=True)
class DropoutLayer:
    """One dropout layer of an exported head, as `head.onnx` takes its mask.

    Args:
        name: module path inside the PyTorch head (e.g. "0" in a Sequential).
        p: drop probability; the mask holds Bernoulli(1 - p) / (1 - p).
        width: features per row of its input: the mask input is (N, width).
    """

    name: str
    p: float
    width: int


def draw_masks(
    layers: Sequence[DropoutLayer], rows: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Dropout masks for `rows` head passes: float32 Bernoulli(1 - p) / (1 - p), (rows, width)."""
    return [
        (rng.random((rows, layer.width), dtype=np.float32) >= layer.p).astype(np.float32)
        / np.float32(1 - layer.p)
        for layer in layers
    ]


def find_export(path: Path | str) -> Path:
    """The export folder for `path`: itself if it holds model.json, else `<path>/export`.

    Raises:
        CxrError: neither holds an export; the message says how to make one.
    """
    path = Path(path)
    for folder in (path, path / "export"):
        if (folder / MODEL_JSON).is_file():
            return folder
    raise CxrError(
        f"{path}: no ONNX export (model.json) here or in {path / 'export'}; "
        f"run `cxrfusion export --run {path}` first"
    )


def read_metadata(folder: Path) -> dict:
    """model.json of an export folder, checked for the format this version reads."""
    path = folder / MODEL_JSON
    try:
        metadata = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CxrError(f"{path}: not readable JSON ({error})") from None
    if metadata.get("format") != FORMAT_VERSION:
        raise CxrError(
            f"{path}: export format {metadata.get('format')!r}, this cxrfusion reads "
            f"{FORMAT_VERSION}; export the run again with this version"
        )
    missing = sorted(REQUIRED_KEYS - set(metadata))
    if missing:
        raise CxrError(
            f"{path}: no {', '.join(missing)} (written by an older cxrfusion); export the run "
            "again with this version"
        )
    return metadata


class OnnxEngine:
    """The Engine protocol on ONNX Runtime: deterministic logits and MC-dropout samples.

    Args:
        path: an export folder (model.json, features.onnx, head.onnx) or a run directory whose
            `export/` holds one.
        threads: ONNX Runtime intra-op threads per session (None: its default, all cores).
    """

    def __init__(self, path: Path | str, threads: int | None = None) -> None:
        self.folder = find_export(path)
        self.metadata = read_metadata(self.folder)
        self.labels: tuple[str, ...] = tuple(self.metadata["labels"])
        self.input_size: int = int(self.metadata["input_size"])
        self.layers = [DropoutLayer(**layer) for layer in self.metadata["dropout"]]
        normalization = self.metadata["normalization"]
        self.mean, self.std = tuple(normalization["mean"]), tuple(normalization["std"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # Two sessions (features, head), each with its own pool, beside torch's threads: pools
        # that spin between calls take the cores from each other. Measured with
        # bench/inference.py --threads 2 (densenet121, batch 1): 34.2 ms spinning, 16.5 ms not.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        files = self.metadata["files"]
        self._features, self._head = (
            self._session(self.folder / files[key], options) for key in ("features", "head")
        )

    @staticmethod
    def _session(path: Path, options: ort.SessionOptions) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # ORT raises its own untyped exceptions for bad files
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise CxrError(f"{path}: not a loadable ONNX graph ({first[:200]})") from None

    def features(self, x: np.ndarray) -> np.ndarray:
        """Normalised images (B, 3, H, W) -> features (B, F), float32."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        expected = (3, self.input_size, self.input_size)
        if x.ndim != 4 or x.shape[1:] != expected:
            raise ValueError(
                f"expected float32 (B, {', '.join(map(str, expected))}), got {x.shape}"
            )
        check_model_input(x, self.mean, self.std)
        return self._features.run(None, {"image": x})[0]

    def head(self, features: np.ndarray, masks: Sequence[np.ndarray]) -> np.ndarray:
        """Features (N, F) and one mask (N, width) per dropout layer -> logits (N, classes)."""
        inputs = {f"mask{i}": mask for i, mask in enumerate(masks)}
        return self._head.run(None, {"features": features, **inputs})[0]

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Normalised images (B, 3, H, W) -> deterministic logits (B, classes), dropout off."""
        features = self.features(x)
        ones = [np.ones((len(features), layer.width), np.float32) for layer in self.layers]
        return self.head(features, ones)

    def sample_logits(self, x: np.ndarray, samples: int, seed: int) -> np.ndarray:
        """MC-dropout logits (T, B, classes): features once, the head on T x B rows at once.

        Args:
            x: normalised images (B, 3, H, W).
            samples: T, the number of stochastic passes.
            seed: seeds the NumPy generator of the dropout masks (same seed, same samples).
        """
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        return self._sample_head(self.features(x), samples, seed)

    def sample_logits_each(self, x: np.ndarray, samples: int, seeds: Sequence[int]) -> np.ndarray:
        """MC-dropout logits (T, B, classes), image b's as `sample_logits(x[b:b+1], samples,
        seeds[b])` gives them: features of the batch at once, then each image's head on its own
        T rows with masks from its own generator, so no image depends on its neighbours."""
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        if len(seeds) != len(x):
            raise ValueError(f"expected one seed per image ({len(x)}), got {len(seeds)}")
        features = self.features(x)
        per_image = [
            self._sample_head(features[b : b + 1], samples, seed) for b, seed in enumerate(seeds)
        ]
        return np.concatenate(per_image, axis=1)

    def _sample_head(self, features: np.ndarray, samples: int, seed: int) -> np.ndarray:
        """(T, B, classes) head samples of features (B, F), masks drawn under `seed`."""
        if not self.layers:  # no dropout: every sample is the deterministic pass
            logits = self.head(features, [])
            return np.broadcast_to(logits, (samples, *logits.shape)).copy()
        rows = np.tile(features, (samples, 1))  # row t*B + b is image b, as the torch fast path
        logits = self.head(rows, draw_masks(self.layers, len(rows), np.random.default_rng(seed)))
        return logits.reshape(samples, len(features), -1)


def _warn_if_stale(folder: Path) -> None:
    """An export inside a run copies its temperatures and calibration: say when the run has newer
    ones (evaluate --temperature-scale or calibrate after export), which the torch engine uses."""
    written = (folder / MODEL_JSON).stat().st_mtime
    for name in ("temperature.json", "calibration.json"):
        saved = folder.parent / name
        if saved.is_file() and saved.stat().st_mtime > written:
            log.warning(
                "%s is newer than the export %s: run `cxrfusion export` again to use it",
                saved,
                folder,
            )


def _card(metadata: dict) -> dict:
    """The run's model card, plus the quantisation of an INT8 export (what it was checked on)."""
    card = metadata.get("card", {})
    quantization = metadata.get("quantization")
    return card if quantization is None else {**card, "quantization": quantization}


def load_onnx(path: Path, device: str | None = None) -> tuple[OnnxEngine, ModelSpec]:
    """The engine and spec of an export, for `Classifier.load(path, engine="onnx")`.

    Args:
        path: an export folder or a run directory holding `export/` (`find_export`).
        device: None or "cpu": ONNX Runtime runs on the CPU here.
    """
    if device not in (None, "cpu"):
        raise CxrError(f"--device {device}: the onnx engine runs on the CPU; use --engine torch")
    engine = OnnxEngine(path)
    _warn_if_stale(engine.folder)
    meta = engine.metadata
    temperatures = meta.get("temperatures")
    calibration = meta.get("calibration")
    spec = ModelSpec(
        labels=engine.labels,
        model=meta["model"],
        cache_size=int(meta["cache_size"]),
        input_size=engine.input_size,
        mean=engine.mean,
        std=engine.std,
        threshold=float(meta["threshold"]),
        temperatures=None
        if temperatures is None
        else np.array([temperatures[k] for k in engine.labels]),
        details=_card(meta),
        calibration=None
        if calibration is None
        else calibration_from_dict(calibration, engine.folder / MODEL_JSON),
    )
    return engine, spec
