"""Load a trained run for inference: `model, config = load_run("runs/fusion")`."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from cxrfusion.errors import CxrError
from cxrfusion.training.config import TrainConfig
from cxrfusion.training.module import CxrClassifier

log = logging.getLogger(__name__)


def resolve_checkpoint(path: Path) -> Path:
    """A run directory means its best.ckpt; a file is taken as it is."""
    path = Path(path)
    checkpoint = path / "best.ckpt" if path.is_dir() else path
    if not checkpoint.exists():
        raise CxrError(f"{checkpoint}: checkpoint not found (train a model first)")
    return checkpoint


def load_run(path: Path, device: str | torch.device = "cpu") -> tuple[CxrClassifier, TrainConfig]:
    """The trained classifier (eval mode) and the config of its run.

    Args:
        path: a run directory or a checkpoint inside one (its folder holds config.yaml).
        device: where to put the model.
    """
    checkpoint = resolve_checkpoint(path)
    config_file = checkpoint.parent / "config.yaml"
    if not config_file.exists():
        raise CxrError(f"{config_file}: missing; a checkpoint must sit in its run directory")
    config = TrainConfig.from_yaml(config_file)
    try:
        # The checkpoint holds every weight: never download pretrained ones again.
        model = CxrClassifier.load_from_checkpoint(checkpoint, map_location=device, weights="none")
    except (RuntimeError, EOFError, KeyError, OSError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CxrError(f"{checkpoint}: not a loadable checkpoint ({first})") from None
    return model.eval(), config
