"""Monte-Carlo dropout predictions over a whole split, and their predictions.csv table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from cxrfusion.data.dataset import CachedXrayDataset
from cxrfusion.data.transforms import normalize
from cxrfusion.errors import CxrError
from cxrfusion.labels import LABELS
from cxrfusion.models import CxrModel
from cxrfusion.models.mc_dropout import mc_dropout_logits
from cxrfusion.stats.uncertainty import flag
from cxrfusion.tables import read_csv

PREDICTIONS = "predictions.csv"
PATIENT = "Patient ID"
TRUE_COLUMNS = [f"true_{label}" for label in LABELS]


def model_input(model: CxrModel, images: torch.Tensor) -> torch.Tensor:
    """uint8 batch from the loader -> input normalised for `model`, channels-last on its device."""
    device = next(model.parameters()).device
    x = normalize(images.to(device, non_blocking=True), model.mean, model.std)
    return x.contiguous(memory_format=torch.channels_last)


def predict_sample_logits(
    model: CxrModel,
    dataset: CachedXrayDataset,
    samples: int = 25,
    mode: str = "head",
    batch_size: int = 64,
    seed: int = 0,
) -> np.ndarray:
    """Logits (T, N, 14) of T dropout samples for every image of `dataset`, in order.

    Logits, not probabilities: temperature scaling divides them, and the sigmoid of a float32
    probability near 0 or 1 cannot be inverted exactly.

    Args:
        model: the trained network in eval mode, on its device.
        dataset: the split to predict (no augmentation).
        samples: T stochastic passes.
        mode: "head" (backbone once, head T times) or "full" (T whole passes).
        batch_size: images per forward pass.
        seed: seeds the dropout masks of each batch, so a run repeats exactly.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    out = []
    for batch, (images, _, _) in enumerate(
        tqdm(loader, desc="MC dropout", unit="batch", disable=None)
    ):
        logits = mc_dropout_logits(model, model_input(model, images), samples, mode, seed + batch)
        out.append(logits.float().cpu().numpy())
    return np.concatenate(out, axis=1)


def predictions_table(
    split: pd.DataFrame, summary: dict[str, np.ndarray], threshold: float
) -> pd.DataFrame:
    """The predictions.csv table: mean and std per label, uncertainty, review flag, truth.

    Args:
        split: the split.csv rows of the predicted images, in prediction order.
        summary: `summarise_samples` output for those images.
        threshold: per-image uncertainty above which an image is flagged for review.
    """
    table = split[["Image Index", "Patient ID"]].reset_index(drop=True)
    means = pd.DataFrame(summary["mean"], columns=list(LABELS))
    stds = pd.DataFrame(summary["std"], columns=[f"{label}_std" for label in LABELS])
    truth = split[list(LABELS)].reset_index(drop=True)
    truth.columns = [f"true_{label}" for label in LABELS]
    extra = pd.DataFrame(
        {
            "uncertainty": summary["uncertainty"],
            "flag": flag(summary["uncertainty"], threshold).astype(int),
        }
    )
    return pd.concat([table, means, stds, extra, truth], axis=1)


def read_predictions(eval_dir: Path) -> pd.DataFrame:
    """An evaluation's predictions.csv indexed by image, checked for what a comparison needs."""
    path = Path(eval_dir) / PREDICTIONS
    if not path.is_file():
        raise CxrError(f"{path}: missing; run `cxrfusion evaluate` for this run first")
    frame = read_csv(path, "evaluate's predictions")
    needed = ["Image Index", PATIENT, *LABELS, *TRUE_COLUMNS]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise CxrError(f"{path}: missing columns {', '.join(missing)}")
    if frame.empty:
        raise CxrError(f"{path}: no rows")
    if frame["Image Index"].isna().any() or frame["Image Index"].duplicated().any():
        raise CxrError(f"{path}: 'Image Index' is empty or repeated in some rows")
    if frame[PATIENT].isna().any():
        raise CxrError(f"{path}: an empty value in the patient column")
    values = frame[[*LABELS, *TRUE_COLUMNS]].apply(pd.to_numeric, errors="coerce")
    if not np.isfinite(values[list(LABELS)].to_numpy(dtype=float)).all():
        raise CxrError(f"{path}: a non-numeric or empty value in the score columns")
    truth = values[TRUE_COLUMNS]
    # Empty truth is an unknown label (the dataset does not report that finding).
    if not (truth.isin((0, 1)) | truth.isna()).all().all():
        raise CxrError(f"{path}: the true_<label> columns must hold only 0, 1 or empty")
    frame[values.columns] = values
    frame[PATIENT] = frame[PATIENT].astype(str)
    return frame.set_index("Image Index")
