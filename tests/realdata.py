"""Tiny runs on real NIH radiographs for the inference tests (cheap enough for a module fixture)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cxrfusion.data.options import PrepareOptions
from cxrfusion.data.prepare import prepare
from cxrfusion.training.config import TrainConfig
from cxrfusion.training.fit import train

REAL_IMAGES = 40
CACHE_SIZE, INPUT_SIZE = 192, 160  # both resizes do real work on the 256-px sample


def prepare_real(nih_sample: Path, root: Path, n: int = REAL_IMAGES) -> Path:
    """The first `n` sample images (NIH layout, symlinked), split by patient and cached."""
    table = pd.read_csv(nih_sample / "Data_Entry_2017.csv").head(n)
    (root / "nih" / "images").mkdir(parents=True)
    table.to_csv(root / "nih" / "Data_Entry_2017.csv", index=False)
    for name in table["Image Index"]:
        (root / "nih" / "images" / name).symlink_to(nih_sample / "images" / name)
    prepare(root / "nih", root / "prepared", PrepareOptions(patient_fraction=1.0, size=CACHE_SIZE))
    return root / "prepared"


def train_tiny(prepared: Path, out: Path, model: str) -> Path:
    """One epoch from random init: enough for predictions that depend on every pixel."""
    config = TrainConfig(
        prepared=str(prepared),
        out=str(out),
        model=model,
        weights="none",
        epochs=1,
        phase1_epochs=0,
        cache_size=CACHE_SIZE,
        input_size=INPUT_SIZE,
        workers=0,
        batch_size=8,
    )
    train(config)
    return out


def split_images(run: Path, nih_sample: Path) -> list[Path]:
    """The original files of the run's test split, in split order."""
    split = pd.read_csv(run / "split.csv")
    names = split.loc[split["split"] == "test", "Image Index"]
    return [nih_sample / "images" / name for name in names]
