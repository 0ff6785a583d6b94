"""`cxrfusion train`: a run directory from a config, trained by Lightning's Trainer."""

from __future__ import annotations

import logging
import platform
import shutil
import sys
from pathlib import Path

import lightning as L
import pandas as pd
import torch
import yaml
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

import cxrfusion
from cxrfusion.atomic import write_atomic
from cxrfusion.data.dataset import split_datasets
from cxrfusion.data.options import Augmentation
from cxrfusion.errors import CxrError
from cxrfusion.models.weights import describe_weights
from cxrfusion.training.callbacks import AtomicCheckpointIO, EpochMetrics, TwoPhaseTraining
from cxrfusion.training.config import TrainConfig
from cxrfusion.training.module import MONITOR, CxrClassifier

log = logging.getLogger(__name__)


def _precision(requested: str) -> str:
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def _loaders(config: TrainConfig) -> dict[str, DataLoader]:
    datasets = split_datasets(
        Path(config.prepared),
        config.cache_size,
        config.input_size,
        Augmentation(**config.augmentation),
    )
    for name in ("train", "val"):
        if len(datasets[name]) == 0:
            raise CxrError(f"{config.prepared}/split.csv: the {name} split is empty")

    def loader(name: str) -> DataLoader:
        train = name == "train"
        return DataLoader(
            datasets[name],
            batch_size=config.batch_size,
            shuffle=train,
            drop_last=train and len(datasets[name]) > config.batch_size,
            num_workers=config.workers,
            persistent_workers=config.workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    return {name: loader(name) for name in ("train", "val")}


def _write_run_files(config: TrainConfig, run_dir: Path) -> None:
    """What reproduces the run from its directory: config, split and software versions."""
    write_atomic(run_dir / "config.yaml", config.to_yaml() + describe_weights(config.weights))
    shutil.copyfile(Path(config.prepared) / "split.csv", run_dir / "split.csv")
    environment = {
        "cxrfusion": cxrfusion.__version__,
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "lightning": L.__version__,
        "command": " ".join(sys.argv),
    }
    write_atomic(run_dir / "environment.yaml", yaml.safe_dump(environment, sort_keys=False))


def train(config: TrainConfig, resume: bool = False) -> Path:
    """Train one model into `config.out`; with `resume`, continue from its last.ckpt.

    Returns the run directory, holding config.yaml, split.csv, environment.yaml, metrics.csv,
    loss_curves.png, best.ckpt (highest validation macro AUC) and last.ckpt.
    """
    run_dir = Path(config.out)
    last = run_dir / "last.ckpt"
    if not resume and last.exists():
        raise CxrError(f"{run_dir}: already holds a run; pass --resume or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(config.seed, workers=True, verbose=False)
    loaders = _loaders(config)
    if not resume:
        _write_run_files(config, run_dir)
    module = CxrClassifier(
        model=config.model,
        weights=config.weights,
        loss=config.loss,
        focal_alpha=config.focal_alpha,
        focal_gamma=config.focal_gamma,
        lr=config.lr,
        min_lr=config.min_lr,
        plateau_patience=config.plateau_patience,
        plateau_factor=config.plateau_factor,
        channels_last=config.channels_last,
    )
    trainer = L.Trainer(
        default_root_dir=run_dir,
        max_epochs=config.epochs,
        accelerator=config.accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy=config.strategy,
        precision=_precision(config.precision),
        limit_train_batches=config.limit_train_batches,
        logger=CSVLogger(run_dir, name="logs"),
        plugins=[AtomicCheckpointIO()],
        callbacks=[
            TwoPhaseTraining(config.phase1_epochs, config.phase2_lr),
            ModelCheckpoint(
                dirpath=run_dir,
                filename="best",
                monitor=MONITOR,
                mode="max",
                save_last=True,
                enable_version_counter=False,
            ),
            EarlyStopping(MONITOR, mode="max", patience=config.early_stop_patience),
            EpochMetrics(run_dir),
        ],
        log_every_n_steps=10,
        num_sanity_val_steps=0,
        deterministic=False,
    )
    trainer.fit(module, loaders["train"], loaders["val"], ckpt_path=last if resume else None)
    return run_dir


def best_epoch(run_dir: Path) -> tuple[int, float]:
    """The epoch with the best validation macro AUC in a run's metrics.csv, and that AUC."""
    history = pd.read_csv(run_dir / "metrics.csv")
    best = history[MONITOR].idxmax()
    return int(history["epoch"][best]), float(history[MONITOR][best])
