"""Load a trained run for inference: `model, config = load_run("runs/fusion")`."""

from __future__ import annotations

import logging
import pickle
import zipfile
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
    _check_checkpoint(checkpoint)
    try:
        # The checkpoint holds every weight: never download pretrained ones again.
        model = CxrClassifier.load_from_checkpoint(checkpoint, map_location=device, weights="none")
    except (RuntimeError, KeyError) as error:  # e.g. weights that do not fit the model
        raise CxrError(f"{checkpoint}: cannot be loaded ({_first_line(error)})") from None
    return model.eval(), config


def _first_line(error: BaseException) -> str:
    """`Type: first sentence` of an exception, short enough for a one-line message."""
    text = str(error).strip().splitlines()[0].split(". ")[0][:120] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _check_checkpoint(checkpoint: Path) -> None:
    """Refuse a file that is not a Lightning checkpoint: text, truncated, corrupt or foreign."""
    if not zipfile.is_zipfile(checkpoint):
        raise CxrError(
            f"{checkpoint}: not a checkpoint (text, truncated or corrupt; torch.save writes a zip)"
        )
    try:
        # mmap: only the structure is read here, the tensors stay on disk.
        content = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, KeyError, ValueError, OSError) as error:
        raise CxrError(f"{checkpoint}: not a readable checkpoint ({_first_line(error)})") from None
    keys = ("state_dict", "hyper_parameters", "pytorch-lightning_version")
    missing = [k for k in keys if k not in content] if isinstance(content, dict) else list(keys)
    if missing:
        raise CxrError(f"{checkpoint}: not a checkpoint of `cxrfusion train` (no {missing[0]})")
