"""The PyTorch engine: a run's checkpoint on CPU or GPU, MC dropout by `mc_dropout_logits`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cxrfusion.data.transforms import check_model_input
from cxrfusion.inference.engines import ModelSpec
from cxrfusion.inference.runs import load_run, run_card, run_threshold
from cxrfusion.labels import LABELS
from cxrfusion.models import CxrModel
from cxrfusion.models.mc_dropout import mc_dropout_logits, mc_dropout_logits_per_image
from cxrfusion.stats.conformal import load_calibration
from cxrfusion.stats.temperature import read_temperature


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
        check_model_input(x, self.model.mean, self.model.std)
        return torch.from_numpy(x).to(self.device).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.model(self._tensor(x)).float().cpu().numpy()

    def sample_logits(self, x: np.ndarray, samples: int, seed: int) -> np.ndarray:
        # torch draws the masks under `seed`, as evaluate's batches do: same seed, same batch,
        # same numbers as evaluate.
        logits = mc_dropout_logits(self.model, self._tensor(x), samples, "head", seed)
        return logits.float().cpu().numpy()

    def sample_logits_each(self, x: np.ndarray, samples: int, seeds: Sequence[int]) -> np.ndarray:
        logits = mc_dropout_logits_per_image(self.model, self._tensor(x), samples, seeds)
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
    model, config = load_run(Path(run), device)
    run_dir = Path(run) if Path(run).is_dir() else Path(run).parent
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
