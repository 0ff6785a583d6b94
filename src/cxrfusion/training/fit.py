"""`cxrfusion train`: a run directory from a config, trained by Lightning's Trainer."""

from __future__ import annotations

import dataclasses
import logging
import platform
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import timm
import torch
import yaml
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

import cxrfusion
from cxrfusion.atomic import write_atomic
from cxrfusion.data.cache import open_cache
from cxrfusion.data.dataset import split_datasets
from cxrfusion.data.options import Augmentation
from cxrfusion.errors import CxrError
from cxrfusion.models.weights import describe_weights
from cxrfusion.training.callbacks import AtomicCheckpointIO, EpochMetrics, TwoPhaseTraining
from cxrfusion.training.config import TrainConfig
from cxrfusion.training.data import CxrDataModule
from cxrfusion.training.launch import ddp_strategy, launch_rank
from cxrfusion.training.losses import ASL_NAN
from cxrfusion.training.module import MONITOR, CxrClassifier
from cxrfusion.training.progress import progress_bar
from cxrfusion.training.resume import RandomState

log = logging.getLogger(__name__)
COMPILE_OPTIONS: dict[str, object] = {}  # torch.compile's arguments under --compile (tests: eager)
EXPECTED_WARNINGS = (  # lines a user cannot act on, kept out of the log
    r"Checkpoint directory .* exists and is not empty",  # config.yaml etc. are there by design
    r".*isinstance\(treespec, LeafSpec\)",  # Lightning's call of a deprecated torch API
)


def _precision(requested: str) -> str:
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def _data(config: TrainConfig, split_file: Path) -> CxrDataModule:
    datasets = split_datasets(
        Path(config.prepared),
        config.cache_size,
        config.input_size,
        Augmentation(**config.augmentation),
        split_file=split_file,
        seed=config.seed,
    )
    for name in ("train", "val"):
        if len(datasets[name]) == 0:
            raise CxrError(f"{split_file}: the {name} split is empty")
    if config.loss == "asl" and torch.isnan(datasets["train"].targets).any():
        raise CxrError(f"{split_file}: some training labels are unknown (NaN); {ASL_NAN}")
    return CxrDataModule(
        datasets, config.batch_size, config.workers, config.seed, config.cache_on_device
    )


def _logger(config: TrainConfig, run_dir: Path) -> Logger:
    """Lightning's step-level log beside metrics.csv: CSV files or TensorBoard events in logs/."""
    if config.logger == "tensorboard":
        return TensorBoardLogger(run_dir, name="logs", default_hp_metric=False)
    return CSVLogger(run_dir, name="logs")


def _git_commit() -> str | None:
    """The commit of the cxrfusion source tree, with "-dirty" for local changes; None outside git."""
    source = Path(cxrfusion.__file__).parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit


def environment(config: TrainConfig) -> dict[str, object]:
    """What produced a run: software versions, source commit, command and image-cache fingerprint."""
    return {
        "cxrfusion": cxrfusion.__version__,
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "lightning": L.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "cache_fingerprint": open_cache(Path(config.prepared), config.cache_size).fingerprint,
        "command": " ".join(sys.argv),
    }


def _write_run_files(config: TrainConfig, run_dir: Path, resume: bool) -> None:
    """What reproduces the run from its directory: config, split and software versions.

    A resumed run rewrites config.yaml only (it may extend --epochs); its split and environment
    stay those of the run's start. `prepared` is saved as an absolute path, so that evaluate,
    calibrate and export find the run's images from any working directory.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = dataclasses.replace(config, prepared=str(Path(config.prepared).absolute()))
    write_atomic(run_dir / "config.yaml", saved.to_yaml() + describe_weights(config.weights))
    if resume:
        return
    shutil.copyfile(Path(config.prepared) / "split.csv", run_dir / "split.csv")
    env = yaml.safe_dump(environment(config), sort_keys=False)
    write_atomic(run_dir / "environment.yaml", env)


def _module(config: TrainConfig) -> CxrClassifier:
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
    if config.compile:
        module.compile_model(**COMPILE_OPTIONS)
    return module


def _trainer(config: TrainConfig, run_dir: Path, frozen_phase: bool) -> L.Trainer:
    strategy = ddp_strategy(
        config.strategy, config.accelerator, config.devices, config.num_nodes, frozen_phase
    )
    return L.Trainer(
        default_root_dir=run_dir,
        max_epochs=config.epochs,
        accelerator=config.accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy=strategy,
        precision=_precision(config.precision),
        limit_train_batches=config.limit_train_batches,
        logger=_logger(config, run_dir),
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
                # at the very end of the epoch, after metrics.csv and the plateau step, so that
                # a resumed run starts the next epoch from exactly this state
                save_on_train_epoch_end=True,
            ),
            EarlyStopping(MONITOR, mode="max", patience=config.early_stop_patience),
            EpochMetrics(run_dir),
            RandomState(),
            progress_bar(),
        ],
        use_distributed_sampler=False,  # CxrDataModule shards with its own seeded samplers
        log_every_n_steps=10,
        num_sanity_val_steps=0,
        # Set here, where the run starts: cuDNN times its algorithms for each new input shape
        # once and keeps the fastest; --deterministic trades that for repeatable kernels.
        benchmark=not config.deterministic,
        deterministic="warn" if config.deterministic else False,
    )


def train(config: TrainConfig, resume: bool = False) -> Path:
    """Train one model into `config.out`; with `resume`, continue from its last.ckpt.

    Nothing is written into the run directory until the data and the model are built, so a
    mistake found there leaves no directory behind. A resumed run reads the split saved in its
    directory. Returns the run directory, holding config.yaml, split.csv, environment.yaml,
    metrics.csv, loss_curves.png, best.ckpt (highest validation macro AUC) and last.ckpt.
    """
    run_dir = Path(config.out)
    last = run_dir / "last.ckpt"
    if resume and not last.exists():
        raise CxrError(f"{last}: no checkpoint to resume from; train without --resume first")
    if not resume and last.exists():
        raise CxrError(f"{run_dir}: already holds a run; pass --resume or choose another --out")
    L.seed_everything(config.seed, workers=True, verbose=False)
    data = _data(config, run_dir / "split.csv" if resume else Path(config.prepared) / "split.csv")
    module = _module(config)
    frozen_phase = module.model.has_backbone and config.phase1_epochs > 0
    trainer = _trainer(config, run_dir, frozen_phase)
    if launch_rank() == 0:
        _write_run_files(config, run_dir, resume)
    with warnings.catch_warnings():
        for message in EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        trainer.fit(module, datamodule=data, ckpt_path=last if resume else None)
    return run_dir


def best_epoch(run_dir: Path) -> tuple[int, float]:
    """The epoch with the best validation macro AUC in a run's metrics.csv, and that AUC.

    The epoch is counted from 1, as the progress lines count them; metrics.csv keeps Lightning's
    0-based `epoch` column.
    """
    history = pd.read_csv(run_dir / "metrics.csv")
    best = history[MONITOR].idxmax()
    return int(history["epoch"][best]) + 1, float(history[MONITOR][best])
