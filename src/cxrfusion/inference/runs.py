"""Load a trained run: `model, config = load_run("runs/fusion")`, and what else it saved for inference
(its review threshold, its fitted temperatures)."""

from __future__ import annotations

import json
import logging
import pickle
import zipfile
from pathlib import Path

import torch

from cxrfusion.data.split import read_split
from cxrfusion.errors import CxrError
from cxrfusion.labels import LABELS
from cxrfusion.models import CxrModel, create_model
from cxrfusion.training.config import TrainConfig

log = logging.getLogger(__name__)


def resolve_checkpoint(path: Path) -> Path:
    """A run directory means its best.ckpt; a file is taken as it is."""
    path = Path(path)
    checkpoint = path / "best.ckpt" if path.is_dir() else path
    if not checkpoint.exists():
        raise CxrError(f"{checkpoint}: checkpoint not found (train a model first)")
    return checkpoint


def load_run(path: Path, device: str | torch.device = "cpu") -> tuple[CxrModel, TrainConfig]:
    """The trained model (eval mode) and the config of its run.

    The model is rebuilt from the checkpoint's hyperparameters and its weights loaded without
    Lightning, whose import alone takes seconds that `predict` and `serve` should not pay.

    Args:
        path: a run directory or a checkpoint inside one (its folder holds config.yaml).
        device: where to put the model.
    """
    checkpoint = resolve_checkpoint(path)
    config_file = checkpoint.parent / "config.yaml"
    if not config_file.exists():
        raise CxrError(
            f"{checkpoint}: no config.yaml beside it; a checkpoint must sit in its run directory"
        )
    config = TrainConfig.from_yaml(config_file)
    content = _read_checkpoint(checkpoint)
    prefix = "model."  # the LightningModule's attribute holding the model
    try:
        state = {
            key.removeprefix(prefix): value
            for key, value in content["state_dict"].items()
            if key.startswith(prefix)
        }
        # The checkpoint holds every weight: never download pretrained ones again.
        model = create_model(content["hyper_parameters"]["model"], len(LABELS), weights="none")
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, AttributeError) as error:  # e.g. unfitting weights
        raise CxrError(f"{checkpoint}: cannot be loaded ({_first_line(error)})") from None
    return model.to(device).eval(), config


def _first_line(error: BaseException) -> str:
    """`Type: first sentence` of an exception, short enough for a one-line message."""
    text = str(error).strip().splitlines()[0].split(". ")[0][:120] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _read_checkpoint(checkpoint: Path) -> dict:
    """A checkpoint of `cxrfusion train` (tensors on the CPU, mapped from the file, not read);
    text, truncated, corrupt or foreign files are refused."""
    if not zipfile.is_zipfile(checkpoint):
        raise CxrError(
            f"{checkpoint}: not a checkpoint (text, truncated or corrupt; torch.save writes a zip)"
        )
    try:
        content = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, KeyError, ValueError, OSError) as error:
        raise CxrError(f"{checkpoint}: not a readable checkpoint ({_first_line(error)})") from None
    keys = ("state_dict", "hyper_parameters", "pytorch-lightning_version")
    missing = [k for k in keys if k not in content] if isinstance(content, dict) else list(keys)
    if missing:
        raise CxrError(f"{checkpoint}: not a checkpoint of `cxrfusion train` (no {missing[0]})")
    return content


DEFAULT_THRESHOLD = 0.1  # the report's review threshold on the uncertainty score


def run_threshold(run_dir: Path) -> float:
    """The review threshold the run was evaluated with (its latest eval_*/metrics.json), else
    the report's 0.1."""
    evaluations = sorted(Path(run_dir).glob("eval_*/metrics.json"), key=lambda p: p.stat().st_mtime)
    for path in reversed(evaluations):
        try:
            return float(json.loads(path.read_text())["uncertainty"]["threshold"])
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("%s: no readable uncertainty threshold, skipped", path)
    return DEFAULT_THRESHOLD


def run_card(run_dir: Path) -> dict:
    """What a run directory says about its training data and validation, for a model card.

    Returns:
        {"training_data": {"prepared": folder name, "splits": {split: {"images", "patients"}}},
         "evaluations": {split: {"auc": evaluate's AUCs with CIs, "calibration": ...}}}
        with whatever the run holds (evaluations only for the splits evaluated).
    """
    run_dir = Path(run_dir)
    card: dict = {"training_data": {}, "evaluations": {}}
    config_file = run_dir / "config.yaml"
    if config_file.exists():
        # the name only: a served card should not show the training machine's paths
        card["training_data"]["prepared"] = Path(TrainConfig.from_yaml(config_file).prepared).name
    if (run_dir / "split.csv").exists():
        split = read_split(run_dir / "split.csv")
        groups = split.groupby("split", sort=False)
        card["training_data"]["splits"] = {
            name: {"images": int(len(part)), "patients": int(part["Patient ID"].nunique())}
            for name, part in groups
        }
    for path in sorted(run_dir.glob("eval_*/metrics.json")):
        try:
            metrics = json.loads(path.read_text())
            card["evaluations"][metrics["split"]] = {
                key: metrics[key] for key in ("auc", "calibration") if key in metrics
            }
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("%s: unreadable metrics, left out of the model card", path)
    return card
