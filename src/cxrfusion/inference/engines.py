"""Engines turn normalised input into logits; everything else (temperatures, uncertainty, flags)
happens in the `Classifier`, with the same code as `evaluate`.

An engine is loaded by name (`ENGINE_LOADERS`): a loader takes a path and a device and returns the
engine and the `ModelSpec` the Classifier needs to prepare input and read output. `torch`
(`torch_engine.load_torch`) runs the run's checkpoint; `onnx` (`onnx_engine.load_onnx`) runs an
export on ONNX Runtime, and this module, like the rest of that path, does not import torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from cxrfusion.data.transforms import Triple
from cxrfusion.stats.conformal import Calibration

# engine name -> (module, loader function): imported only when that engine is asked for.
ENGINE_LOADERS: dict[str, tuple[str, str]] = {
    "torch": ("cxrfusion.inference.torch_engine", "load_torch"),
    "onnx": ("cxrfusion.inference.onnx_engine", "load_onnx"),
}


class Engine(Protocol):
    """Logits from normalised float32 input (B, 3, H, W)."""

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(B, 14) deterministic logits, dropout off."""
        ...

    def sample_logits(self, x: np.ndarray, samples: int, seed: int) -> np.ndarray:
        """(T, B, 14) MC-dropout logits: features once, the head T times with dropout on; the
        same `seed` and batch give the same samples."""
        ...

    def sample_logits_each(self, x: np.ndarray, samples: int, seeds: Sequence[int]) -> np.ndarray:
        """(T, B, 14) MC-dropout logits, image b's masks drawn under `seeds[b]` alone: image b
        gets `sample_logits(x[b:b+1], samples, seeds[b])`, whatever else is in the batch (up to
        the float rounding of features computed in a batch)."""
        ...


@dataclass(frozen=True)
class ModelSpec:
    """What the Classifier needs besides logits.

    Attributes:
        labels: output order (the 14 LABELS).
        model: architecture name (registry name).
        cache_size / input_size: the two resizes of `transforms.preprocess`.
        mean / std: the model's input normalisation.
        threshold: review threshold on the uncertainty score.
        temperatures: per-class temperatures (14,) fitted by evaluate, or None.
        details: the model card's run-derived part (`runs.run_card`).
        calibration: the run's conformal decision thresholds and referral rule
            (`cxrfusion calibrate`), or None.
    """

    labels: tuple[str, ...]
    model: str
    cache_size: int
    input_size: int
    mean: Triple
    std: Triple
    threshold: float
    temperatures: np.ndarray | None = None
    details: dict = field(default_factory=dict)
    calibration: Calibration | None = None
