"""Engines turn normalised input into logits; everything else (temperatures, uncertainty, flags)
happens in the `Classifier`, with the same code as `evaluate`.

An engine is loaded by name (`ENGINE_LOADERS`): a loader takes a path and a device and returns the
engine and the `ModelSpec` the Classifier needs to prepare input and read output. `torch` runs the
run's checkpoint; `onnx` (module `cxrfusion.inference.onnx_engine`, function `load_onnx`) runs an
export.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from cxrfusion.data.transforms import Triple
from cxrfusion.evaluation.conformal import Calibration, load_calibration
from cxrfusion.evaluation.temperature import read_temperature
from cxrfusion.evaluation.uncertainty import mc_dropout_logits
from cxrfusion.inference.runs import load_run, run_card, run_threshold
from cxrfusion.labels import LABELS
from cxrfusion.models import CxrModel

# engine name -> (module, loader function): imported only when that engine is asked for.
ENGINE_LOADERS: dict[str, tuple[str, str]] = {
    "torch": ("cxrfusion.inference.engines", "load_torch"),
    "onnx": ("cxrfusion.inference.onnx_engine", "load_onnx"),
}


class Engine(Protocol):
    """Logits from normalised float32 input (B, 3, H, W)."""

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(B, 14) deterministic logits, dropout off."""
        ...

    def sample_logits(self, x: np.ndarray, samples: int, rng: np.random.Generator) -> np.ndarray:
        """(T, B, 14) MC-dropout logits: features once, the head T times with dropout on."""
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


class TorchEngine:
    """A PyTorch model: MC dropout runs the backbone once and the head T times.

    Args:
        model: a trained cxrfusion model; put in eval mode here.
        device: where it runs (the model is moved there).
    """

    def __init__(self, model: CxrModel, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()

    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).to(self.device).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.model(self._tensor(x)).float().cpu().numpy()

    def sample_logits(self, x: np.ndarray, samples: int, rng: np.random.Generator) -> np.ndarray:
        # torch draws the dropout masks; the generator only seeds them, so calls repeat.
        seed = int(rng.integers(2**63 - 1))
        logits = mc_dropout_logits(self.model, self._tensor(x), samples, "head", seed)
        return logits.float().cpu().numpy()

    def gradcam(self, x: np.ndarray, class_index: int) -> np.ndarray:
        """Grad-CAM heatmap (H, W) in [0, 1] of one class for one image (1, 3, H, W)."""
        from cxrfusion.explain import gradcam  # matplotlib and pytorch-grad-cam: only when asked

        return gradcam(self.model, self._tensor(x), class_index)


def load_torch(run: Path, device: str | None = None) -> tuple[TorchEngine, ModelSpec]:
    """The engine and spec of a run directory (or a checkpoint in one).

    Args:
        run: the run; its best.ckpt, config.yaml, and when present temperature.json and
            eval_*/metrics.json (the threshold it was evaluated with) and calibration.json are
            read.
        device: "cpu", "cuda", ...; default CUDA when available.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    module, config = load_run(Path(run), device)
    run_dir = Path(run) if Path(run).is_dir() else Path(run).parent
    model = module.model
    spec = ModelSpec(
        labels=LABELS,
        model=config.model,
        cache_size=config.cache_size,
        input_size=config.input_size,
        mean=model.mean,
        std=model.std,
        threshold=run_threshold(run_dir),
        temperatures=read_temperature(run_dir),
        details=run_card(run_dir),
        calibration=load_calibration(run_dir),
    )
    return TorchEngine(model, device), spec
